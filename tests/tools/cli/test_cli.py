"""dit-sparse CLI end to end on the embedded tiny model: outputs decode, sidecars, resume, kill safety, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest

from dit_sparse.tools.cli import main
from dit_sparse.tools.render import write_atomic

#: --min-tokens 0: the embedded model's 320 tokens are below the CPU's break-even, where presets run dense
FAST = ["--steps", "3", "--quiet", "--min-tokens", "0"]


def frames_of(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def test_help_shows_examples(capsys):
    for cmd in ("render", "compare", "presets", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_presets_command(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "hunyuanvideo:rectified-90" in out and "tiny-wan:" in out
    assert main(["presets", "--json", "--family", "flux"]) == 0
    assert all(p["family"] == "flux" for p in json.loads(capsys.readouterr().out))


def test_render_default_writes_video_and_sidecar(tmp_path):
    assert main(["render", "--out", str(tmp_path), *FAST, "--name", "clip"]) == 0
    video, side = tmp_path / "clip.mp4", tmp_path / "clip.json"
    assert frames_of(video) > 1
    meta = json.loads(side.read_text())
    for key in ("model", "preset", "config", "seed", "steps", "timings", "measured_density", "versions", "prompt"):
        assert key in meta, key
    assert meta["model"] == "embedded" and meta["steps"] == 3 and meta["preset"].startswith("tiny-wan:")
    assert 0 < meta["measured_density"] < 1 and meta["attention_calls"]["sparse"] > 0
    assert meta["measured_density"] == round(meta["measured_density"], 4)
    # what was rendered, read back from the file: frames, size; and dtype, device
    assert (meta["frames"], meta["height"], meta["width"]) == (frames_of(video), 64, 64) == (17, 64, 64)
    assert (meta["dtype"], meta["device"]) == ("float32", "cpu")
    assert {"torch", "diffusers", "dit_sparse"} <= set(meta["versions"])
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 0
    # resume: the finished job is skipped, nothing is rewritten
    mtime = video.stat().st_mtime_ns
    assert main(["render", "--out", str(tmp_path), *FAST, "--name", "clip"]) == 0
    assert video.stat().st_mtime_ns == mtime
    assert json.loads((tmp_path / "run_summary.json").read_text())["skipped"] == 1


def test_bad_job_does_not_stop_the_batch(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": "a red circle moving right", "seed": 1, "name": "ok-1", "steps": 2},
        # passes every up-front check, fails inside the pipeline call
        {"prompt": "a blue square moving left", "seed": 2, "name": "bad", "steps": 2,
         "pipeline_kwargs": {"bogus_kwarg": 1}},
        {"prompt": "a green triangle bouncing", "seed": 3, "name": "ok-2", "steps": 2, "preset": "none"},
    ]) + "\n")
    rc = main(["render", "--jobs", str(jobs), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 1  # the exit code reflects the failure
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["results"]}
    assert status == {"ok-1": "done", "bad": "failed", "ok-2": "done"}
    bad = next(r for r in summary["results"] if r["name"] == "bad")
    assert "bogus_kwarg" in bad["error"]
    assert not (tmp_path / "out" / "bad.mp4").exists() and not (tmp_path / "out" / "bad.json").exists()
    assert json.loads((tmp_path / "out" / "ok-2.json").read_text())["preset"] is None  # stock attention


def test_yaml_jobs_and_errors(tmp_path):
    from dit_sparse.tools.render import load_jobs

    y = tmp_path / "jobs.yaml"
    y.write_text("jobs:\n  - prompt: a red circle moving up\n    seed: 4\n    size: 64x48\n")
    (job,) = load_jobs(y)
    assert (job.width, job.height, job.seed) == (64, 48, 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_jobs(bad)
    assert main(["render", "--jobs", str(bad), "--out", str(tmp_path / "o")]) == 2


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "clip.mp4"

    def dies_half_way(p):
        p.write_bytes(b"half a video")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, dies_half_way)
    assert list(tmp_path.iterdir()) == []


def test_compare_reports_speed_and_fidelity(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path), *FAST, "--name", "cmp"]) == 0
    report = json.loads((tmp_path / "cmp-compare.json").read_text())
    assert report["psnr"] > 10 and 0 < report["ssim"] <= 1 and report["speedup"] > 0
    assert frames_of(tmp_path / "cmp-compare.mp4") > 1
    assert "PSNR" in capsys.readouterr().out


def test_dtype_is_honoured_on_the_embedded_model(tmp_path):
    """--dtype bfloat16 changes the computation (not ignored) and the sidecar says so."""
    import imageio.v3 as iio
    import numpy as np

    for dtype in ("float32", "bfloat16"):
        assert main(["render", "--out", str(tmp_path), "--steps", "2", "--quiet", "--dtype", dtype,
                     "--name", dtype]) == 0
        assert json.loads((tmp_path / f"{dtype}.json").read_text())["dtype"] == dtype
    a, b = (iio.imread(tmp_path / f"{d}.mp4").astype(float) for d in ("float32", "bfloat16"))
    assert a.shape == b.shape and np.abs(a - b).mean() > 0.01


#: hooks the console script runs (a ``sitecustomize`` on ``PYTHONPATH``): at the point ``TEST_CTRL_C_AT`` names, the
#: child prints ``TEST-STATE: <point>`` on stderr and waits there until the Ctrl-C comes; the test sends it only then.
#: A state the process reports, never a time: on any load the signal lands at that point.
_CTRL_C_HOOKS = """
import os, sys, time

_at = os.environ.get("TEST_CTRL_C_AT")


def _requested():
    try:
        from dit_sparse.tools import interrupts
    except ImportError:
        return False
    return interrupts.requested()


def _hold(where):
    print(f"TEST-STATE: {where}", file=sys.stderr, flush=True)
    while not _requested():  # the Ctrl-C raises KeyboardInterrupt here, or (in a finaliser) is recorded
        time.sleep(0.01)


if _at:
    import diffusers
    from diffusers.models.transformers import transformer_wan
    from imageio.plugins.ffmpeg import FfmpegFormat

    from dit_sparse.tiny import model
    from dit_sparse.tools import render

    _build, _generate = model.build_pipeline, render.Renderer.generate
    _block, _append = transformer_wan.WanTransformerBlock.forward, FfmpegFormat.Writer._append_data
    _job, _blocks, _frames = [None], [0], [0]

    class _Finaliser:
        def __del__(self):
            _hold("loading (in a finaliser)")

    def build_pipeline(*args, **kwargs):
        pipe = _build(*args, **kwargs)
        if _at == "loading":
            _hold("loading")
        elif _at == "finaliser":  # as regex's Group.__del__ while a tokenizer loads
            _Finaliser()
        return pipe

    def generate(self, job, preset, **kwargs):
        _job[0], _blocks[0], _frames[0] = job.name, 0, 0
        if _at == "between" and job.name == "job-1":  # job-0 is done and recorded, job-1 has not begun
            _hold("between jobs")
        return _generate(self, job, preset, **kwargs)

    def block(self, *args, **kwargs):
        _blocks[0] += 1  # 4 blocks x 2 CFG branches a step: call 11 is block 3 of step 2
        if _at == "step" and _job[0] == "job-1" and _blocks[0] == 11:
            _hold("inside a step")
        return _block(self, *args, **kwargs)

    def append(self, im, meta):
        _frames[0] += 1  # 5 of the 17 frames are in the encoder, its temporary file is on disk
        if _at == "writing" and _job[0] == "job-1" and _frames[0] == 5:
            _hold("writing the video")
        return _append(self, im, meta)

    model.build_pipeline, render.Renderer.generate = build_pipeline, generate
    transformer_wan.WanTransformerBlock.forward, FfmpegFormat.Writer._append_data = block, append
"""


def _terminal_sigint() -> None:
    """In the child, before exec: SIGINT as a terminal gives it to a command (default action, not blocked). A test
    process may have inherited it ignored or blocked from the tools that ran earlier in the same worker; the child
    would then never see the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


EXE = Path(sys.executable).with_name("dit-sparse")


class HeldRender:
    """``dit-sparse render --jobs jobs.jsonl`` (3 two-step jobs) from ``cwd``, held at ``point`` by the hooks: the
    constructor returns once the child has reported that state on stderr (the timeout only guards a hang)."""

    def __init__(self, cwd: Path, point: str):
        import queue
        import threading

        hooks = cwd / "hooks"
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(_CTRL_C_HOOKS)
        (cwd / "jobs.jsonl").write_text("".join(
            json.dumps({"prompt": p, "seed": i, "name": f"job-{i}", "steps": 2}) + "\n" for i, p in
            enumerate(["a red circle moving right", "a blue square moving left", "a yellow circle moving down"])))
        pythonpath = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TEST_CTRL_C_AT": point}
        self.cmd = [str(EXE), "render", "--jobs", "jobs.jsonl", "--quiet"]
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, preexec_fn=_terminal_sigint)
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=lambda: [self.lines.put(ln) for ln in self.proc.stderr]
                                       + [self.lines.put(None)], daemon=True)
        self.reader.start()
        self.err = []
        while True:
            line = self.lines.get(timeout=600)
            assert line is not None, f"the render ended before {point!r}: rc {self.proc.wait()}\n{self.stderr()}"
            self.err.append(line)
            if line.startswith("TEST-STATE: "):
                break

    def stderr(self) -> str:
        return "".join(self.err)[-4000:]

    def end(self, sig: int) -> tuple[int, str, str]:
        """Send ``sig`` to the process group (as a terminal sends Ctrl-C); ``(rc, stdout, stderr)``."""
        os.killpg(self.proc.pid, sig)
        stdout = self.proc.stdout.read()
        rc = self.proc.wait(timeout=300)
        self.reader.join(timeout=60)
        while (line := self.lines.get_nowait()) is not None:
            self.err.append(line)
        return rc, stdout, "".join(self.err)


@pytest.mark.skipif(not EXE.exists(), reason=f"the dit-sparse console script is not installed ({EXE})")
@pytest.mark.parametrize("point, done", [("loading", 0), ("finaliser", 0), ("between", 1), ("step", 1),
                                         ("writing", 1)])
def test_ctrl_c_stops_cleanly_and_lists_pending_jobs(tmp_path, point, done):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while the model loads (also inside a
    finaliser, where Python's own handler would lose it), between two jobs, inside a denoising step and while the
    video is written: exit 130, one "interrupted" line, the run's summary interrupted with the pending jobs, no
    half-written file."""
    rc, stdout, err = HeldRender(tmp_path, point).end(signal.SIGINT)
    assert rc == 130, f"{point}: rc {rc}\n{stdout}\n{err}"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    said = [ln for ln in err.splitlines() if "interrupted" in ln]
    assert len(said) == 1 and "interrupted (Ctrl-C)" in said[0], err
    out = tmp_path / "outputs"
    (run,) = (out / "runs").glob("*.json")
    assert f"runs/{run.name}" in said[0], said[0]  # the message names this run's summary
    assert f"{done} job(s) rendered in this run are kept, {3 - done} pending" in said[0], said[0]
    for summary in (json.loads(run.read_text()), json.loads((out / "run_summary.json").read_text())):
        assert (summary["state"], summary["interrupted"], summary["done"]) == ("interrupted", True, done)
        assert summary["pending"] == [f"job-{i}" for i in range(done, 3)] and summary["failed"] == 0
    assert not [f for f in out.rglob("*") if ".partial" in f.name]
    assert sorted(f.name for f in out.glob("job-*")) == [n for i in range(done) for n in (f"job-{i}.json",
                                                                                         f"job-{i}.mp4")]
    for i in range(done):
        assert frames_of(out / f"job-{i}.mp4") == 17


@pytest.mark.skipif(not EXE.exists(), reason=f"the dit-sparse console script is not installed ({EXE})")
def test_killed_run_resumes_without_half_written_outputs(tmp_path):
    """kill -9 while job-1's video is half written (a state the child reports): what is left is whole or a
    temporary file, and the same command finishes the rest."""
    held = HeldRender(tmp_path, "writing")
    rc, _, _ = held.end(signal.SIGKILL)
    assert rc == -signal.SIGKILL
    out = tmp_path / "outputs"
    assert sorted(f.name for f in out.glob("job-*")) == ["job-0.json", "job-0.mp4"]  # job-1: temporary files only
    assert frames_of(out / "job-0.mp4") == 17
    rerun = subprocess.run(held.cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["failed"], summary["skipped"], summary["done"]) == (0, 1, 2)
    assert not [f for f in out.rglob("*") if ".partial" in f.name]
    for i in range(3):
        assert frames_of(out / f"job-{i}.mp4") == 17 and (out / f"job-{i}.json").exists()


def test_compare_prints_faster_or_slower(tmp_path, capsys):
    assert main(["compare", "--out", str(tmp_path), "--steps", "2", "--quiet", "--name", "c2", "--min-tokens",
                 "0"]) == 0
    out = capsys.readouterr().out
    assert ("x faster" in out) != ("x slower" in out)
    report = json.loads((tmp_path / "c2-compare.json").read_text())
    assert f"density {report['measured_density']:.2f}," in out


def test_compare_with_a_model_folder_and_prompt(tmp_path, capsys):
    """`compare --model <folder> --prompt ...` (the default prompt used to be looked up first and refused)."""
    from dit_sparse.tiny.model import ASSET_DIR

    assert main(["compare", "--model", str(ASSET_DIR), "--prompt", "a green circle moving up", "--steps", "2",
                 "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "a-green-circle-moving-up-s0-compare.json").read_text())
    assert report["prompt"] == "a green circle moving up" and report["frames"] == 17


def test_default_render_runs_dense_below_the_break_even_and_says_so(tmp_path):
    """The embedded model's 320 tokens are below the CPU's measured break-even: the default preset's
    DensePolicy(min_tokens="auto") runs every call dense (stock speed), says so once, and --min-tokens 0 runs it
    sparse. As a user types it, from another folder."""
    from dit_sparse.backends.break_even import sparse_break_even

    assert sparse_break_even("cpu") > 320
    exe = str(Path(sys.executable).with_name("dit-sparse"))
    run = subprocess.run([exe, "render", "--out", "out", "--steps", "2", "--quiet", "--name", "auto"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr.count("ran every attention call dense") == 1 and "--min-tokens 0" in run.stderr
    meta = json.loads((tmp_path / "out" / "auto.json").read_text())
    assert meta["attention_calls"]["sparse"] == 0 and meta["attention_calls"]["dense"] > 0
    run = subprocess.run([exe, "render", "--out", "out", "--steps", "2", "--quiet", "--name", "sparse",
                          "--min-tokens", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "ran every attention call dense" not in run.stderr
    meta = json.loads((tmp_path / "out" / "sparse.json").read_text())
    assert meta["attention_calls"]["sparse"] > 0 and meta["settings"]["min_tokens"] == 0
    bad = subprocess.run([exe, "render", "--min-tokens", "-3"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and "expected an int >= 0 or 'auto'" in bad.stderr and "Traceback" not in bad.stderr
