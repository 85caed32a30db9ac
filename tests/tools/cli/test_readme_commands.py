"""Every command of the README's "Set-up", "Command line" and "Demo" sections, run as a user types it: the
``dit-sparse`` console script and ``scripts/*.sh`` in a subprocess, started from a folder other than the
repository root. Where the README names a model folder or a GPU, the embedded model's own folder
(``dit_sparse/tiny/assets/tiny_wan``) and the CPU stand in; step counts are lowered only where the README shows none.
(The demo command is tested in ``tests/tools/app/test_app.py``; the Ray commands in ``tests/tools/cli/test_ray.py``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dit_sparse.tiny.model import ASSET_DIR

ROOT = Path(__file__).resolve().parents[3]
EXE = Path(sys.executable).with_name("dit-sparse")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason=f"the dit-sparse console script is not installed ({EXE})")
IN_REPO_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def sh(cmd: list[str], cwd: Path, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def test_help_starts_without_torch(tmp_path):
    """`dit-sparse --help` imports neither torch nor diffusers (it answers at once)."""
    probe = ("import sys\nfrom dit_sparse.tools.cli import main\n"
             "for argv in (['--help'], ['render', '--help'], ['demo', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'numpy') if m in sys.modules))")
    r = ok(sh([sys.executable, "-c", probe], tmp_path))
    assert r.stdout.strip().splitlines()[-1] == "[]"
    # the console script as typed, with torch and diffusers made unimportable: it answers without them (a check
    # of what it imports, not of a time: "at once" on any load)
    for name in ("torch", "diffusers"):
        (tmp_path / "poison" / name).mkdir(parents=True)
        (tmp_path / "poison" / name / "__init__.py").write_text(f"raise ImportError('--help imported {name}')\n")
    path = os.pathsep.join([str(tmp_path / "poison"), os.environ.get("PYTHONPATH", "")])
    for argv in (["--help"], ["render", "--help"], ["demo", "--help"]):
        r = ok(sh([str(EXE), *argv], tmp_path, PYTHONPATH=path))
        assert "usage: dit-sparse" in r.stdout, r.stdout


def test_render_default(tmp_path):
    """`dit-sparse render`: default prompt, embedded model, CPU -> ./outputs."""
    ok(sh([str(EXE), "render"], tmp_path))
    meta = json.loads((tmp_path / "outputs" / "a-red-circle-moving-right-s0.json").read_text())
    assert (tmp_path / "outputs" / "a-red-circle-moving-right-s0.mp4").stat().st_size > 0
    assert (meta["steps"], meta["frames"], meta["height"], meta["width"]) == (20, 17, 64, 64)
    assert meta["preset"] == "tiny-wan:draft-rect-80" and meta["dtype"] == "float32"


def test_render_prompt_seed_steps(tmp_path):
    ok(sh([str(EXE), "render", "--prompt", "a blue square moving left", "--seed", "3", "--steps", "20"], tmp_path))
    meta = json.loads((tmp_path / "outputs" / "a-blue-square-moving-left-s3.json").read_text())
    assert (meta["seed"], meta["steps"]) == (3, 20)


def test_render_jobs_file(tmp_path):
    """`dit-sparse render --jobs jobs.jsonl --out renders/` (relative paths, from the user's folder)."""
    (tmp_path / "jobs.jsonl").write_text(
        '{"prompt": "a red circle moving right", "seed": 1, "steps": 2}\n'
        '{"prompt": "a green circle moving up", "steps": 2, "size": "48x32", "frames": 9, "name": "small"}\n')
    r = ok(sh([str(EXE), "render", "--jobs", "jobs.jsonl", "--out", "renders/"], tmp_path))
    assert "2 done" in r.stdout
    meta = json.loads((tmp_path / "renders" / "small.json").read_text())
    assert (meta["frames"], meta["width"], meta["height"]) == (9, 48, 32)


def test_render_local_model_folder_with_prompt(tmp_path):
    """The README's `--model <folder> --preset ... --prompt ...` line; the embedded model's folder is the local
    model (CPU for cuda; its own size). Then without --preset: the choice is printed with the reason, and
    --quiet leaves no loading bars."""
    r = ok(sh([str(EXE), "render", "--model", str(ASSET_DIR), "--preset", "tiny-wan:draft-rect-80",
               "--device", "cpu", "--dtype", "bfloat16", "--prompt", "a fox in the snow", "--frames", "17",
               "--size", "64x64", "--steps", "2"], tmp_path))
    meta = json.loads((tmp_path / "outputs" / "a-fox-in-the-snow-s0.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["model"] == str(ASSET_DIR) and meta["frames"] == 17
    r = ok(sh([str(EXE), "render", "--model", str(ASSET_DIR), "--prompt", "a red square moving up",
               "--steps", "2", "--quiet"], tmp_path))
    assert "using 'tiny-wan:draft-rect-80' because" in r.stderr and "toy-sized Wan model" in r.stderr
    assert "Loading" not in r.stderr and "%|" not in r.stderr, r.stderr  # --quiet: no loading bars
    assert json.loads((tmp_path / "outputs" / "a-red-square-moving-up-s0.json").read_text())["steps"] == 2


def test_compare(tmp_path):
    r = ok(sh([str(EXE), "compare", "--prompt", "a red circle moving right"], tmp_path))
    assert "PSNR" in r.stdout and ("x faster" in r.stdout or "x slower" in r.stdout)
    assert (tmp_path / "outputs" / "a-red-circle-moving-right-s0-compare.mp4").exists()


def test_presets(tmp_path):
    r = ok(sh([str(EXE), "presets"], tmp_path))
    assert "tiny-wan:draft-rect-80" in r.stdout and "wan2.1-t2v-1.3b:draft-80" in r.stdout


def test_bad_input_is_one_line_exit_2(tmp_path):
    r = sh([str(EXE), "render", "--steps", "0"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--steps" in r.stderr


@pytest.mark.skipif(not IN_REPO_VENV, reason="scripts/*.sh use the repository's .venv; run the tests in it")
def test_render_script_from_another_folder(tmp_path):
    """`bash scripts/render.sh --jobs my.jsonl`, started elsewhere: relative paths are the caller's."""
    (tmp_path / "my.jsonl").write_text('{"prompt": "a white square bouncing", "steps": 2, "name": "mine"}\n')
    ok(sh(["bash", str(ROOT / "scripts" / "render.sh"), "--jobs", "my.jsonl", "--quiet"], tmp_path))
    assert (tmp_path / "outputs" / "mine.mp4").exists() and (tmp_path / "outputs" / "mine.json").exists()


@pytest.mark.skipif(not IN_REPO_VENV, reason="scripts/*.sh use the repository's .venv; run the tests in it")
def test_test_script_from_another_folder(tmp_path):
    """`bash scripts/test.sh`, `bash scripts/test.sh tests/engine/core -x` and `DIT_SPARSE_TEST_WORKERS=0 bash
    scripts/test.sh` (collection only here: the suite cannot run itself); the default runs two xdist workers."""
    script = str(ROOT / "scripts" / "test.sh")
    r = ok(sh(["bash", script, "--co", "-q", "tests/tools/cli/test_validation.py", "-x"], tmp_path))
    assert "test_validation.py" in r.stdout
    # the workers are real: an unknown worker count is pytest-xdist's error, 0 runs serially
    bad = sh(["bash", script, "--co", "-q", "tests/tools/cli/test_validation.py"], tmp_path,
             DIT_SPARSE_TEST_WORKERS="x")
    assert bad.returncode != 0 and "-n" in bad.stderr + bad.stdout
    serial = ok(sh(["bash", script, "--co", "-q", "tests/tools/cli/test_validation.py"], tmp_path,
                   DIT_SPARSE_TEST_WORKERS="0"))
    assert "test_validation.py" in serial.stdout


def test_python_m_app(tmp_path):
    """`python -m app` from the repository root (kept), and the packaged `python -m dit_sparse.tools.app` anywhere."""
    assert "--port" in ok(sh([sys.executable, "-m", "app", "--help"], ROOT)).stdout
    assert "--port" in ok(sh([sys.executable, "-m", "dit_sparse.tools.app", "--help"], tmp_path)).stdout
