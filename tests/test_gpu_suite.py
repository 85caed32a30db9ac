"""The GPU suite's machinery on CPU, with cheap stand-in stages: results under OUT as each stage ends (a run cut at
the device's time limit keeps them), the stage in progress killed with its whole process group, the test stage's
command line and environment. No test waits on a clock: each waits for a state the suite or its stage reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite  # noqa: E402

#: a stage-2 stand-in: starts a grandchild (as pytest starts workers), writes both pids, then blocks
_BLOCKING = ("import subprocess, sys, time, pathlib; "
             "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
             "pathlib.Path(sys.argv[1], 'pids.tmp').write_text(f'{__import__(\"os\").getpid()} {g.pid}'); "
             "pathlib.Path(sys.argv[1], 'pids.tmp').rename(pathlib.Path(sys.argv[1], 'pids')); "
             "print('stage two running', flush=True); time.sleep(3600)")
#: a stage-1 stand-in: the op benchmark's JSON, as attention.py writes it
_OP_JSON = ("import json, pathlib, sys; "
            "pathlib.Path(sys.argv[1], 'attention-cpu.json').write_text(json.dumps({'rows': [], 'skipped': ['x'], "
            "'stopped': None})); print('1 passed')")
_SUITE = ("import sys; sys.path.insert(0, {root!r}); from benchmarks import gpu_suite as g; "
          "table = {{'op': g.Stage(600, [[sys.executable, '-c', {op!r}, '{{raw}}']]), "
          "'breakdown': g.Stage(600, [[sys.executable, '-c', {block!r}, '{{raw}}']])}}; "
          "raise SystemExit(g.main(sys.argv[1:], table=table))")


def _wait_for(check, what: str, deadline_s: float = 300.0):
    """Poll for a state (a generous deadline only turns a hang into a failure; nothing is timed)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    """The process is gone or a zombie (killed; its parent or init has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _start_suite(out: Path) -> subprocess.Popen:
    code = _SUITE.format(root=str(ROOT), op=_OP_JSON, block=_BLOCKING)
    return subprocess.Popen([sys.executable, "-c", code, str(out), "--smoke"], cwd=out.parent,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stage_two_pids(out: Path) -> tuple[int, int]:
    path = out / "raw" / "breakdown" / "pids"
    _wait_for(path.is_file, "stage two to start")
    child, grandchild = map(int, path.read_text().split())
    return child, grandchild


def _payload(out: Path) -> dict:
    return json.loads((out / "gpu_suite.json").read_text())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_suite_keeps_the_finished_stage(tmp_path):
    """SIGKILL (nothing can be caught): stage 1's JSON and the suite's record of it are already under OUT."""
    out = tmp_path / "out"
    suite = _start_suite(out)
    child, grandchild = _stage_two_pids(out)
    try:
        payload = _payload(out)  # written when stage two started
        assert payload["state"] == "running breakdown"
        assert [(s["stage"], s["status"]) for s in payload["stages"]] == [("op", "ok"), ("breakdown", "running")]
        suite.kill()
        suite.wait()
        _wait_for(lambda: _gone(child), "the stage's command to die with the suite")  # PR_SET_PDEATHSIG
        assert (out / "raw" / "op" / "attention-cpu.json").is_file()
        payload = _payload(out)
        assert payload["stages"][0]["result"] == "1 passed"
        assert payload["results"]["op"] == {"rows": [], "skipped": ["x"], "stopped": None}
        assert "No row measured" in (out / "summary.md").read_text()
        assert "stage two running" in (out / "suite.log").read_text()  # streamed, not written at the end
    finally:
        suite.kill()
        suite.wait()
        try:
            os.killpg(child, signal.SIGKILL)  # the stage's own group: the suite can no longer kill it
        except ProcessLookupError:
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_kills_the_stage_group_and_writes_what_was_measured(tmp_path):
    """SIGTERM (the device's time limit): the stage in progress and its grandchild die, the stage is recorded as
    killed, stage 1's results stay, and the suite exits 128 + 15."""
    out = tmp_path / "out"
    suite = _start_suite(out)
    child, grandchild = _stage_two_pids(out)
    try:
        suite.send_signal(signal.SIGTERM)
        _, err = suite.communicate(timeout=300)
        assert suite.returncode == 128 + signal.SIGTERM, err
        assert "killed (SIGTERM)" in err
        _wait_for(lambda: _gone(child) and _gone(grandchild), "the stage's processes to die")
        payload = _payload(out)
        assert payload["state"] == "killed (SIGTERM)"
        assert payload["stages"][0]["status"] == "ok" and payload["stages"][1]["stage"] == "breakdown"
        assert payload["stages"][1]["status"].startswith("killed (SIGTERM) after ")
        assert "stage two running" in payload["stages"][1]["tail"]
        assert "op" in payload["results"] and (out / "raw" / "op" / "attention-cpu.json").is_file()
    finally:
        suite.kill()
        suite.wait()
        for pid in (child, grandchild):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_command_leaves_no_process_behind(tmp_path):
    """A command that exits and leaves a worker running (as a crashed pytest leaves its xdist workers): the worker
    is killed with the command's process group; a command past its timeout is killed and has no exit code."""
    log = tmp_path / "log"
    log.touch()
    script = ("import subprocess, sys, pathlib; g = subprocess.Popen([sys.executable, '-c', "
              "'import time; time.sleep(3600)']); pathlib.Path(sys.argv[1]).write_text(str(g.pid)); print('left')")
    rc, text = gpu_suite.run_command([sys.executable, "-c", script, str(tmp_path / "pid")], dict(os.environ), 300,
                                     log)
    assert rc == 0 and text.strip() == "left" and log.read_text().strip() == "left"
    worker = int((tmp_path / "pid").read_text())
    _wait_for(lambda: _gone(worker), "the leftover worker to die")
    rc, _ = gpu_suite.run_command([sys.executable, "-c", "import time; time.sleep(3600)"], dict(os.environ), 0.5,
                                  log)
    assert rc is None


def test_test_stage_runs_serially_with_one_config_per_key(tmp_path):
    """The tests stage: no xdist workers, ``DIT_SPARSE_AUTOTUNE=quick`` in its processes' environment (the
    kernels' prune reads it), shown by --dry-run; the op stage's --budget inside its limit; 8 minutes in all."""
    tests = gpu_suite.STAGES["tests"]
    assert tests.env == {"DIT_SPARSE_AUTOTUNE": "quick"}
    for cmd in tests.commands:
        full = gpu_suite.expand(cmd, tmp_path)
        assert "-n" not in full and full[full.index("no:xdist") - 1] == "-p"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "unused", "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[tests,")]
    assert len(lines) == 2 and all("] DIT_SPARSE_AUTOTUNE=quick " in ln and "-p no:xdist" in ln for ln in lines)
    assert "[hopper_options," in res.stdout
    # the environment reaches the stage's processes
    log = tmp_path / "log"
    log.touch()
    stage = gpu_suite.Stage(300, [[sys.executable, "-c", "import os; print(os.environ['DIT_SPARSE_AUTOTUNE'])"]],
                            {"DIT_SPARSE_AUTOTUNE": "quick"})
    record = gpu_suite.run_stage("tests", stage, tmp_path / "raw", log, dict(os.environ))
    assert record["status"] == "ok" and record["tail"].strip() == "quick"
    assert "DIT_SPARSE_AUTOTUNE=quick" in log.read_text().splitlines()[1]  # the command line as run


def test_refuses_a_folder_with_an_earlier_run(tmp_path):
    (tmp_path / "gpu_suite.json").write_text("{}")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), str(tmp_path), "--smoke"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "already holds an earlier run (gpu_suite.json)" in res.stderr


def test_hopper_options_as_a_user_types_it(tmp_path):
    """``python benchmarks/hopper_options.py`` from another folder: on CPU it refuses with the fix (exit 2); its
    ``--smoke`` run times every switch in the interpreter, each checked against the reference, JSON under --out."""
    script = str(ROOT / "benchmarks" / "hopper_options.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import torch

    if not torch.cuda.is_available():
        res = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             env=env)
        assert res.returncode == 2 and "compute capability 9.0+" in res.stderr and "--smoke" in res.stderr
    res = subprocess.run([sys.executable, script, "--smoke", "--out", "res"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "res" / "hopper_options-cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(_variants())
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-3 for r in rows), rows
    assert "warp specialisation on" in next(r["path"] for r in rows if r["variant"] == "warp_specialize")


def _variants():
    from benchmarks.hopper_options import VARIANTS

    return VARIANTS
