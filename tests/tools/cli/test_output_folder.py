"""The output folder of `dit-sparse render`, through the console script from the user's own folder: reruns with other
settings, skipping without loading the model, concurrent runs, file name limits, a full disk, a killed run.
One-step renders of the embedded model keep it short; hooks run in the child through a ``sitecustomize`` on
``PYTHONPATH`` and report states (files) that the tests wait for, never a time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

EXE = Path(sys.executable).with_name("dit-sparse")
pytestmark = pytest.mark.skipif(not EXE.exists(), reason=f"the dit-sparse console script is not installed ({EXE})")
ONE_STEP = ["--steps", "1", "--quiet"]
LOADING = "loading the embedded tiny model"


def env(hooks: Path | None = None, **extra: str) -> dict:
    path = os.environ.get("PYTHONPATH", "")
    if hooks is not None:
        path = f"{hooks}{os.pathsep}{path}" if path else str(hooks)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def dit(args: list[str], cwd: Path, hooks: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=env(hooks, **extra))


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, r.stderr
    return errors[0]


def frames_of(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def partials(folder: Path) -> list[Path]:
    return [f for f in folder.rglob("*") if ".partial" in f.name]


def run_file(stdout: str, out: Path) -> dict:
    """The summary of the run that printed ``stdout`` (its last line names ``runs/<run>.json``)."""
    name = stdout.strip().splitlines()[-1].rsplit("(", 1)[1].rstrip(")")
    return json.loads((out / name).read_text())


def write_jobs(path: Path, names: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": "a red circle moving right", "seed": i, "name": n, "steps": 1})
                            + "\n" for i, n in enumerate(names)))
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A folder with ``outputs/clip.mp4`` rendered by `dit-sparse render --name clip --steps 1`."""
    root = tmp_path_factory.mktemp("rendered")
    ok(dit(["render", "--name", "clip", *ONE_STEP], root))
    return root / "outputs"


def user_folder(tmp_path: Path, rendered: Path) -> Path:
    shutil.copytree(rendered, tmp_path / "outputs")
    return tmp_path


def test_rerun_with_other_settings_is_refused_and_force_renders_again(tmp_path, rendered):
    cwd = user_folder(tmp_path, rendered)
    video = cwd / "outputs" / "clip.mp4"
    before = video.read_bytes()
    for flags, said in ((["--steps", "2"], "steps=1, this job asks steps=2"),
                        (["--steps", "1", "--seed", "3"], "seed=0, this job asks seed=3"),
                        (["--steps", "1", "--preset", "none"], "preset='tiny-wan:draft-rect-80', this job asks "
                                                               "preset=none (stock attention)"),
                        (["--steps", "1", "--prompt", "a blue square"], "prompt='a red circle moving right'")):
        r = dit(["render", "--name", "clip", "--quiet", *flags], cwd)
        line = one_line_error(r)
        assert f"outputs/clip.mp4 was rendered with {said}" in line, line
        assert "pass --force to re-render or use another --name" in line
        assert LOADING not in r.stderr  # refused before the model loads
    assert video.read_bytes() == before
    r = ok(dit(["render", "--name", "clip", "--steps", "2", "--quiet", "--force"], cwd))
    assert "1 done" in r.stdout
    assert json.loads((cwd / "outputs" / "clip.json").read_text())["steps"] == 2
    assert video.read_bytes() != before and frames_of(video) > 1 and not partials(cwd / "outputs")
    r = ok(dit(["render", "--name", "clip", "--steps", "2", "--quiet"], cwd))  # the same settings: skipped
    assert "skipped (already rendered)" in r.stdout


def test_job_file_rerun_names_the_line(tmp_path, rendered):
    cwd = user_folder(tmp_path, rendered)
    (cwd / "jobs.jsonl").write_text('{"prompt": "a red circle moving right", "name": "clip", "steps": 1, '
                                    '"size": "48x64"}\n')
    line = one_line_error(dit(["render", "--jobs", "jobs.jsonl", "--quiet"], cwd))
    assert "jobs.jsonl:1: outputs/clip.mp4 was rendered with width=64" in line and "this job asks width=48" in line
    assert "another name for the job" in line


def test_every_job_skipped_loads_no_model(tmp_path, rendered):
    cwd = user_folder(tmp_path, rendered)
    r = ok(dit(["render", "--name", "clip", *ONE_STEP], cwd))
    assert LOADING not in r.stderr and "the model is not loaded" in r.stderr
    assert "skipped (already rendered)" in r.stdout
    summary = run_file(r.stdout, cwd / "outputs")
    assert (summary["state"], summary["skipped"], summary["done"]) == ("finished", 1, 0)
    assert json.loads((cwd / "outputs" / "run_summary.json").read_text())["run"] == summary["run"]


def test_two_concurrent_runs_into_one_folder(tmp_path):
    """Both finish, each run's summary lists its own jobs only, whichever order they run in."""
    names = {"a": ["a-0", "a-1"], "b": ["b-0", "b-1"]}
    procs = {k: subprocess.Popen([str(EXE), "render", "--jobs", str(write_jobs(tmp_path / f"{k}.jsonl", v)),
                                  "--out", "shared", "--quiet"], cwd=tmp_path, env=env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, v in names.items()}
    outs = {k: p.communicate(timeout=600) for k, p in procs.items()}
    out = tmp_path / "shared"
    for k, p in procs.items():
        assert p.returncode == 0 and "Traceback" not in outs[k][1], outs[k][1][-3000:]
        summary = run_file(outs[k][0], out)
        assert [r["name"] for r in summary["results"]] == names[k] and summary["state"] == "finished"
        assert summary["done"] == 2
    latest = json.loads((out / "run_summary.json").read_text())
    assert [r["name"] for r in latest["results"]] in names.values()
    for n in names["a"] + names["b"]:
        assert frames_of(out / f"{n}.mp4") > 1
    assert not partials(out)


def test_a_name_too_long_for_the_file_system_is_refused_before_loading(tmp_path):
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")  # 255 on most file systems
    r = dit(["render", "--name", "x" * (name_max - 5), *ONE_STEP], tmp_path)
    line = one_line_error(r)
    assert f"--name: {name_max - 5} bytes is too long" in line and f"at most {name_max} bytes" in line, line
    assert LOADING not in r.stderr
    limit = int(line.rsplit("at most ", 1)[1].split()[0])
    ok(dit(["render", "--name", "x" * limit, *ONE_STEP], tmp_path))  # the longest name it allows works
    assert frames_of(tmp_path / "outputs" / f"{'x' * limit}.mp4") > 1


_HOOKS = '''
import errno, os, pathlib, time

_full = os.environ.get("TEST_DISK_FULL_AFTER")  # summaries cannot be written once this file exists
if _full:
    _write_text = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        summary = self.name.startswith(".run_summary.partial") or self.parent.name == "runs"
        if summary and ".partial" in self.name and pathlib.Path(_full).exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return _write_text(self, *args, **kwargs)

    pathlib.Path.write_text = write_text

_hold = os.environ.get("TEST_HOLD_MEDIA")  # job-0's video is written to its temporary file, then held
if _hold:
    from dit_sparse.tools import outputs

    _write_atomic = outputs.write_atomic

    def write_atomic(path, write):
        if pathlib.Path(path).name == "job-0.mp4":
            write(outputs.temp_name(pathlib.Path(path)))
            pathlib.Path(_hold).touch()
            while True:
                time.sleep(0.05)
        return _write_atomic(path, write)

    outputs.write_atomic = write_atomic
'''


@pytest.fixture
def hooks(tmp_path) -> Path:
    folder = tmp_path / "hooks"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(_HOOKS)
    return folder


def test_a_full_disk_keeps_the_summary_and_the_rendered_files(tmp_path, hooks):
    write_jobs(tmp_path / "jobs.jsonl", ["job-0", "job-1"])
    out = tmp_path / "outputs"
    r = dit(["render", "--jobs", "jobs.jsonl", "--quiet"], tmp_path, hooks,
            TEST_DISK_FULL_AFTER=str(out / "job-0.json"))
    line = one_line_error(r)
    assert "No space left on device" in line and "1 job(s) rendered in this run are kept (job-0)" in line, line
    assert "is left as it was" in line and "rerun the same command" in line
    assert frames_of(out / "job-0.mp4") > 1 and json.loads((out / "job-0.json").read_text())["name"] == "job-0"
    previous = json.loads((out / "run_summary.json").read_text())  # the last one written, whole
    assert previous["state"] == "running" and previous["current"] == "job-0"
    assert not (out / "job-1.mp4").exists() and not partials(out)


def test_a_killed_run_is_reported_and_its_temporary_files_removed(tmp_path, hooks):
    from dit_sparse.tools.outputs import temp_name

    write_jobs(tmp_path / "jobs.jsonl", ["job-0", "job-1"])
    out, held = tmp_path / "outputs", tmp_path / "held"
    cmd = [str(EXE), "render", "--jobs", "jobs.jsonl", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(hooks, TEST_HOLD_MEDIA=str(held)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # a guard against a hang only: the test waits for the state the child reports
    while not held.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "job-0 was never written"
        time.sleep(0.05)
    (first,) = (out / "runs").glob("*.json")
    assert json.loads(first.read_text())["current"] == "job-0"  # the summary says which job runs
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert json.loads(first.read_text())["state"] == "running" and partials(out)
    alive = temp_name(out / "other.mp4")  # a temporary file of a live process (this one): it must survive
    alive.write_bytes(b"")
    r = ok(dit(cmd[1:], tmp_path))
    said = [ln for ln in r.stderr.splitlines() if "did not finish" in ln]
    assert len(said) == 1 and "2 job(s) were pending: job-0, job-1" in said[0], r.stderr
    assert partials(out) == [alive]
    killed = json.loads(first.read_text())
    assert killed["state"] == "killed" and killed["finished"] is False and killed["pending"] == ["job-0", "job-1"]
    assert run_file(r.stdout, out)["state"] == "finished"
    assert frames_of(out / "job-0.mp4") > 1 and frames_of(out / "job-1.mp4") > 1
    assert "did not finish" not in ok(dit(cmd[1:], tmp_path)).stderr  # said once
