"""First-hour findings of a new user, each through the console script as a user types it (from another folder): long
prompts, the demo's URL and its port/host errors, the long-run warning, pipeline_kwargs cross-checks, a copy of the
embedded model's folder. One-step renders of the embedded model keep them short."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("dit-sparse")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason=f"the dit-sparse console script is not installed ({EXE})")
LOADING = "dit-sparse: loading "
LONG = "a red circle moving right and a blue square moving left and a yellow triangle moving down " * 2


def dit(args: list[str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **extra}
    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess, rc: int = 2) -> str:
    assert r.returncode == rc, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, r.stderr
    return errors[0]


def lines_with(text: str, r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if text in ln]


# -- 3: prompts longer than the text encoder takes -------------------------------------------------------------
def test_long_prompts_warn_once_with_the_tokens_kept(tmp_path):
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in [
        {"prompt": "a red circle moving right", "name": "short", "steps": 1},
        {"prompt": LONG, "name": "long-1", "steps": 1},
        {"prompt": "a blue square", "negative_prompt": LONG, "name": "long-2", "steps": 1}]))
    r = ok(dit(["render", "--jobs", "jobs.jsonl", "--quiet"], tmp_path))
    said = lines_with("text encoder", r)
    assert len(said) == 1, r.stderr  # once, for the whole run
    assert "jobs.jsonl:2: prompt is 39 tokens long but the text encoder keeps only the first 32" in said[0], said
    assert "1 other prompt(s) too" in said[0] and "shorten the prompt" in said[0]
    assert "3 done" in r.stdout


# -- 5: the demo says where to open it; a busy port or a bad host is one line ---------------------------------
@pytest.fixture
def busy_port():
    """A port this test listens on (so `dit-sparse demo` cannot)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("flags, expect", [
    (["--share-host", "no-such-host.invalid"], "--share-host 'no-such-host.invalid' is not a host name or address"),
    (["--share-host", "192.0.2.1"], "--share-host '192.0.2.1' is not an address of this machine; use --share-host "
                                    "127.0.0.1 (this machine only) or 0.0.0.0"),
    (["--port", "70000"], "--port 70000: expected a port number 1 .. 65535"),
])
def test_demo_bad_host_or_port_is_one_line(tmp_path, flags, expect):
    line = one_line_error(dit(["demo", *flags], tmp_path))
    assert expect in line, line


def test_demo_busy_port_is_one_line_naming_a_free_one(tmp_path, busy_port):
    line = one_line_error(dit(["demo", "--port", str(busy_port)], tmp_path))
    assert f"--port {busy_port} is in use on 127.0.0.1" in line and f"e.g. --port {busy_port + 1}" in line, line


def test_demo_prints_the_url_to_open(tmp_path):
    import queue
    import signal
    import threading
    import urllib.request

    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    proc = subprocess.Popen([str(EXE), "demo", "--port", str(port)], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=300)  # the state it reports, printed once the server listens (timeout: a hang guard)
        assert line.strip() == (f"dit-sparse demo: running, open http://127.0.0.1:{port}/ in a browser; Ctrl-C "
                                "stops it"), (line, proc.poll())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=60) as r:
            assert json.loads(r.read())["title"] == "dit_sparse demo"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130 and "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# -- 8: a run longer than the limit (ten minutes; DIT_SPARSE_LONG_RUN_S) is warned about -------------------------
ESTIMATE, MEASURED = "in the transformer for", "this run will take about"


def test_long_run_warns_before_loading_from_the_estimate(tmp_path):
    """Limit 0 s: every run is "long"; the estimate is printed once, before the model loads."""
    r = ok(dit(["render", "--steps", "2", "--quiet", "--name", "a"], tmp_path, DIT_SPARSE_LONG_RUN_S="0"))
    lines = r.stderr.splitlines()
    said = [i for i, ln in enumerate(lines) if ESTIMATE in ln]
    loading = [i for i, ln in enumerate(lines) if ln.startswith(LOADING)]
    assert len(said) == 1 and said[0] < loading[0], r.stderr
    assert "GFLOP in the transformer for 1 job(s), about" in lines[said[0]] and "a lower bound" in lines[said[0]]
    assert not lines_with(MEASURED, r)  # one warning per run


def test_long_run_warns_from_the_first_steps_when_the_estimate_missed(tmp_path):
    """The estimate is a lower bound (an 18-minute run passed under it): made ~0 s here by a device said to be
    10^18 FLOP/s fast, it stays silent; the first steps' speed then projects the run and warns, once."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text("from dit_sparse.tools import cli\ncli._throughput = lambda *a: 1e18\n")
    job = {"prompt": "a red circle moving right", "steps": 3}
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps({**job, "seed": i, "name": f"job-{i}"}) + "\n"
                                                 for i in range(2)))
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    r = ok(dit(["render", "--jobs", "jobs.jsonl", "--quiet"], tmp_path, DIT_SPARSE_LONG_RUN_S="0.000001",
               PYTHONPATH=path))
    assert not lines_with(ESTIMATE, r), r.stderr
    (said,) = lines_with(MEASURED, r)
    assert "more: a denoising step takes" in said and "4 step(s) of 2 job(s) remain" in said, said
    assert "2 done" in r.stdout


def test_a_short_run_is_not_warned_about_and_a_bad_limit_is_one_line(tmp_path):
    r = ok(dit(["render", "--steps", "2", "--quiet", "--name", "a"], tmp_path))
    assert not lines_with("warning", r), r.stderr
    line = one_line_error(dit(["render", "--steps", "2", "--name", "b"], tmp_path, DIT_SPARSE_LONG_RUN_S="ten"))
    assert "DIT_SPARSE_LONG_RUN_S='ten': expected a number of seconds >= 0" in line, line
    assert LOADING.strip() not in line


# -- 9: pipeline_kwargs cannot override a job's fields; a size the model cannot take fails before loading ------
@pytest.mark.parametrize("kwargs, expect", [
    ({"num_inference_steps": 30}, "'num_inference_steps' is the job's 'steps' field, which pipeline_kwargs must not "
                                  "override (it would bypass the checks and the sidecar); give \"steps\": 30 instead"),
    ({"height": 72}, "'height' is the job's 'height' field, which pipeline_kwargs must not override (it would "
                     "bypass the checks and the sidecar); give \"size\": \"WxH\" (or \"height\": 72) instead"),
    ({"generator": 5}, "give \"seed\": 5 instead"),
    ({"output_type": "pil"}, "'output_type' is set by dit-sparse (it writes the frames itself); drop it"),
])
def test_pipeline_kwargs_that_override_job_fields_are_refused(tmp_path, kwargs, expect):
    job = {"prompt": "a red circle", "steps": 2, "pipeline_kwargs": kwargs}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    r = dit(["render", "--jobs", "jobs.jsonl"], tmp_path)
    line = one_line_error(r)
    assert "jobs.jsonl:1: pipeline_kwargs: " in line and expect in line, line
    assert not lines_with(LOADING, r)


@pytest.mark.parametrize("args, expect", [
    (["--size", "64x72"], "--size: got 72 (int), expected a height that is a multiple of 16 for this model; use 64 "
                          "or 80"),
    (["--jobs", "jobs.jsonl"], "jobs.jsonl:1: height: got 72 (int), expected a height that is a multiple of 16 for "
                               "this model; use 64 or 80"),
])
def test_a_height_the_model_cannot_take_fails_before_loading(tmp_path, args, expect):
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"prompt": "a red circle", "steps": 2, "height": 72}) + "\n")
    r = dit(["render", "--steps", "2", *args], tmp_path)
    line = one_line_error(r)
    assert expect in line, line
    assert not lines_with(LOADING, r)


# -- 11: a copy of the embedded model's folder (or the folder through a link) renders as the embedded model --------
def test_the_shipped_render_defaults_are_the_embedded_models():
    from dit_sparse.tiny.model import ASSET_DIR, RENDER_DEFAULTS_FILE, render_defaults
    from dit_sparse.tools.model_rules import DEFAULTS_FILE, read_render_defaults

    assert RENDER_DEFAULTS_FILE == DEFAULTS_FILE
    assert read_render_defaults(ASSET_DIR) == render_defaults()
    assert render_defaults()["height"] == 64 and render_defaults()["frames"] == 17


def test_a_copied_or_linked_embedded_folder_renders_as_the_embedded_model(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from dit_sparse.tiny.model import ASSET_DIR

    shutil.copytree(ASSET_DIR, tmp_path / "my-copy")
    (tmp_path / "my-link").symlink_to(ASSET_DIR, target_is_directory=True)
    args = ["--prompt", "a red circle moving right", "--steps", "2", "--quiet"]
    ok(dit(["render", *args, "--name", "embedded"], tmp_path))
    for model in ("my-copy", "my-link"):
        r = ok(dit(["render", "--model", model, *args, "--name", model], tmp_path))
        assert not lines_with("warning", r) and not lines_with("defaults", r), r.stderr  # no 832x480 note
        assert "using 'tiny-wan:draft-rect-80'" in r.stderr or model == "my-link", r.stderr
        meta = json.loads((tmp_path / "outputs" / f"{model}.json").read_text())
        assert (meta["frames"], meta["height"], meta["width"], meta["steps"]) == (17, 64, 64, 2)
        assert meta["negative_prompt"] == "" and meta["preset"] == "tiny-wan:draft-rect-80"
        same = [iio.imread(tmp_path / "outputs" / f"{n}.mp4") for n in ("embedded", model)]
        assert same[0].shape == same[1].shape == (17, 64, 64, 3) and np.array_equal(*same)


@pytest.mark.parametrize("content, expect", [
    ('{"height": "big"}', "render_defaults.json: height: got 'big', expected a positive integer"),
    ('{"hieght": 64}', "render_defaults.json: unknown key 'hieght'"),
    ("[1, 2]", "render_defaults.json: got a JSON list, expected an object"),
])
def test_a_bad_render_defaults_file_is_one_line_before_loading(tmp_path, content, expect):
    from dit_sparse.tiny.model import ASSET_DIR

    shutil.copytree(ASSET_DIR, tmp_path / "my-copy")
    (tmp_path / "my-copy" / "render_defaults.json").write_text(content)
    r = dit(["render", "--model", "my-copy", "--prompt", "a red circle", "--steps", "1"], tmp_path)
    line = one_line_error(r)
    assert expect in line and "fix or remove the file" in line, line
    assert not lines_with(LOADING, r)
