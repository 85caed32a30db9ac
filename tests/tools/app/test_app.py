"""The Gradio demo: launched on 127.0.0.1, driven with gradio_client, errors readable, and a real screenshot."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="the demo needs the [app] extra: pip install 'dit_sparse[app]'")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    from dit_sparse.tools.app.ui import launch

    port = free_port()
    demo = launch(host="127.0.0.1", port=port)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_render_through_the_api(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    dense, sparse, report, plan, density = client.predict(
        "a red circle moving right", "custom (methods below)", ["draft", "rectification"], 0.75, 0, 3, 1, 0,
        api_name="/render")
    for video in (dense, sparse):
        path = video["video"] if isinstance(video, dict) else video
        assert Path(path).exists() and Path(path).stat().st_size > 0
    assert "speedup" in report and "PSNR" in report and "density" in report
    assert Path(plan).exists() and Path(density).exists()


def test_bad_input_shows_a_message_not_a_trace(server):
    from gradio_client import Client

    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="Pick at least one method") as err:
        client.predict("a red circle moving right", "custom (methods below)", [], 0.75, 0, 3, 1, 0,
                       api_name="/render")
    assert "Traceback" not in str(err.value)
    with pytest.raises(Exception, match="Type a prompt"):
        client.predict("  ", "custom (methods below)", ["draft"], 0.75, 0, 3, 1, 0, api_name="/render")


@pytest.mark.parametrize("layer, head, seed, expect", [
    (-5, 0, 0, "Plan: layer must be a whole number between 0 and 3"),
    (4, 0, 0, "Plan: layer must be"),
    (1, -5, 0, "Plan: head must be a whole number between 0 and 3"),
    (1, 0, 2**70, "Seed must be a whole number between 0 and 18446744073709551615"),
])
def test_inputs_checked_before_rendering(server, monkeypatch, layer, head, seed, expect):
    from gradio_client import Client

    import dit_sparse.tools.app.ui as ui

    monkeypatch.setattr(ui, "renderer", lambda: (_ for _ in ()).throw(AssertionError("rendered before checking")))
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match=expect.replace("(", r"\(")):
        client.predict("a red circle moving right", ui.CUSTOM, ["draft"], 0.75, seed, 3, layer, head,
                       api_name="/render")


def test_page_config_has_the_title(server):
    import json
    import urllib.request

    with urllib.request.urlopen(server + "config", timeout=30) as r:
        assert json.loads(r.read())["title"] == "dit_sparse demo"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it with apt-get)")
def test_headless_screenshot_renders_the_page(server, tmp_path):
    import numpy as np
    from PIL import Image

    shot = tmp_path / "demo.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=8000",
                    "--window-size=1200,900", f"--screenshot={shot}", server],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists(), "Chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    # a rendered page has text and widgets: many distinct colours and real contrast, not a blank or spinner
    assert img.std() > 10 and len(np.unique(img.reshape(-1, 3)[::97], axis=0)) > 50


def test_dit_sparse_demo_command_answers_a_request(tmp_path):
    """`dit-sparse demo` as a user types it, started from another folder, answers one request."""
    import os

    from gradio_client import Client

    exe = Path(sys.executable).with_name("dit-sparse")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([str(exe), "demo", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for line in proc.stdout:  # the state it reports: the URL, printed once the server listens
            if f"open {url}" in line:
                break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        client = Client(url, verbose=False)
        dense, sparse, report, plan, density = client.predict(
            "a blue square moving left", "tiny-wan:draft-rect-80", ["draft"], 0.75, 1, 2, 1, 0, api_name="/render")
        assert "PSNR" in report and ("faster" in report or "slower" in report)
        assert Path(plan).exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
