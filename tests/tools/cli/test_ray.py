"""``dit-sparse render --ray`` on a local CPU Ray instance (2 actors, the embedded tiny model, 2 steps): outputs,
sidecars, resume, failures and a killed actor, with the same semantics as a local run."""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from dit_sparse.tools.cli import main
from dit_sparse.tools.render import Job

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'dit_sparse[ray]')")

PROMPTS = ["a red circle moving right", "a blue square moving left", "a yellow triangle moving down",
           "a green circle moving up"]


def frames_of(path: Path) -> int:
    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def counting_renderer(log: str, hang: str | None = None):
    """Runs inside an actor: the embedded model, logging every finished render to ``log`` (one line per job).

    The job named ``hang`` blocks the first time it is rendered (the test kills its actor meanwhile); a marker
    file next to ``log`` names the actor.
    """
    from dit_sparse.tools.render import Renderer

    renderer = Renderer("embedded", progress=False, min_tokens=0)  # sparse below the CPU break-even too
    generate = renderer.generate

    def logged(job, preset, **kw):
        marker = Path(f"{log}.hang")
        if job.name == hang and not marker.exists():
            marker.write_text(ray.get_runtime_context().get_actor_name())
            while True:  # until the test kills this actor (the state it waits for is the marker)
                time.sleep(0.05)
        out = generate(job, preset, **kw)
        with open(log, "a") as f:
            f.write(f"{job.name} {os.getpid()}\n")
        return out

    renderer.generate = logged
    return renderer


def rendered(log: Path) -> list[str]:
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def local_ray():
    if ray is None:
        pytest.skip("ray is not installed (pip install 'dit_sparse[ray]')")
    # test functions travel to the actors by value (the tests folder is not importable there)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def four_jobs() -> list[Job]:
    return [Job(prompt=p, seed=i, steps=2, name=f"job-{i}") for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module")
def first_run(local_ray, tmp_path_factory):
    from dit_sparse.tools.ray_batch import render_jobs_ray

    out = tmp_path_factory.mktemp("ray") / "out"
    log = out.parent / "renders.log"
    summary = render_jobs_ray(four_jobs(), out, model="embedded", preset=None, actors=2, progress=False,
                              renderer_factory=functools.partial(counting_renderer, str(log)))
    return out, log, summary


@needs_ray
def test_renders_every_job_once_on_two_actors(first_run):
    out, log, summary = first_run
    assert (summary["jobs"], summary["done"], summary["skipped"], summary["failed"]) == (4, 4, 0, 0)
    assert json.loads((out / "run_summary.json").read_text()) == summary
    assert [r["name"] for r in summary["results"]] == [f"job-{i}" for i in range(4)]  # job order, like local runs
    assert sorted(rendered(log)) == [f"job-{i}" for i in range(4)]
    assert len({line.split()[1] for line in log.read_text().splitlines()}) <= 2  # actor processes
    for i, prompt in enumerate(PROMPTS):
        assert frames_of(out / f"job-{i}.mp4") > 1
        meta = json.loads((out / f"job-{i}.json").read_text())
        assert (meta["name"], meta["prompt"], meta["seed"], meta["steps"]) == (f"job-{i}", prompt, i, 2)
        assert meta["model"] == "embedded" and meta["preset"].startswith("tiny-wan:")  # the model's default
        assert 0 < meta["measured_density"] < 1
    assert not [f for f in out.iterdir() if ".partial" in f.name]


@needs_ray
def test_rerun_skips_finished_jobs(first_run):
    from dit_sparse.tools.ray_batch import render_jobs_ray

    out, log, _ = first_run
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("job-*")}
    summary = render_jobs_ray(four_jobs(), out, model="embedded", preset=None, actors=2, progress=False,
                              renderer_factory=functools.partial(counting_renderer, str(log)))
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 4, 0)
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("job-*")} == mtimes
    assert len(rendered(log)) == 4


@needs_ray
def test_bad_job_fails_alone_and_sets_the_exit_code(local_ray, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in [
        {"prompt": "a red circle moving right", "seed": 1, "name": "ok-1", "steps": 2},
        # passes every up-front check, fails inside the pipeline call
        {"prompt": "a blue square moving left", "seed": 2, "name": "bad", "steps": 2,
         "pipeline_kwargs": {"bogus_kwarg": 1}},
        {"prompt": "a green triangle bouncing", "seed": 3, "name": "ok-2", "steps": 2, "preset": "none"},
    ]) + "\n")
    out = tmp_path / "out"
    assert main(["render", "--jobs", str(jobs), "--out", str(out), "--ray", "--ray-actors", "2", "--quiet"]) == 1
    summary = json.loads((out / "run_summary.json").read_text())
    assert {r["name"]: r["status"] for r in summary["results"]} == {"ok-1": "done", "bad": "failed", "ok-2": "done"}
    bad = next(r for r in summary["results"] if r["name"] == "bad")
    assert "bogus_kwarg" in bad["error"] and "attempts" not in bad  # raised in the job: recorded, not retried
    assert not (out / "bad.mp4").exists() and not (out / "bad.json").exists()
    assert frames_of(out / "ok-1.mp4") > 1 and json.loads((out / "ok-2.json").read_text())["preset"] is None


@needs_ray
def test_killed_actor_loses_no_job_and_renders_none_twice(local_ray, tmp_path):
    from dit_sparse.tools.ray_batch import render_jobs_ray

    out, log = tmp_path / "out", tmp_path / "renders.log"
    marker = Path(f"{log}.hang")
    killed = []

    def kill_the_blocked_actor():  # after the first result, kill the actor that is in the middle of job-2
        while not (marker.exists() and marker.read_text() and list(out.glob("job-*.json"))):  # states, no clock
            time.sleep(0.05)
        ray.kill(ray.get_actor(marker.read_text()))
        killed.append(marker.read_text())

    killer = threading.Thread(target=kill_the_blocked_actor, daemon=True)
    killer.start()
    summary = render_jobs_ray(four_jobs(), out, model="embedded", preset="tiny-wan:draft-75", actors=2,
                              progress=False, renderer_factory=functools.partial(counting_renderer, str(log),
                                                                                  hang="job-2"))
    killer.join(timeout=5)
    assert killed, "the blocked actor was never killed"
    assert (summary["done"], summary["failed"]) == (4, 0), summary
    entry = {r["name"]: r for r in summary["results"]}
    assert entry["job-2"]["attempts"] == 2 and all("attempts" not in entry[f"job-{i}"] for i in (0, 1, 3))
    assert sorted(rendered(log)) == [f"job-{i}" for i in range(4)]  # every job rendered exactly once
    for i in range(4):
        assert frames_of(out / f"job-{i}.mp4") > 1
        assert json.loads((out / f"job-{i}.json").read_text())["preset"] == "tiny-wan:draft-75"


def test_without_ray_the_error_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["render", "--out", str(tmp_path), "--ray", "--quiet"]) == 2  # set-up error: one line, exit 2
    err = capsys.readouterr().err
    assert "pip install 'dit_sparse[ray]'" in err and err.strip().count("\n") == 0
    assert main(["render", "--out", str(tmp_path), "--ray-actors", "2"]) == 2
    assert "--ray-actors needs --ray" in capsys.readouterr().err


def test_ctrl_c_on_the_ray_path_writes_an_interrupted_summary(tmp_path, monkeypatch):
    """Ctrl-C in the driver: run_summary.json says interrupted and names the jobs not finished (as a local run)."""
    import dit_sparse.tools.ray_batch as dist

    class AlreadyUp:  # a Ray that is already initialised: nothing is started or shut down here
        @staticmethod
        def is_initialized():
            return True

    def interrupted_render(self):
        self.results[0] = {"name": self.jobs[0].name, "status": "done"}  # one job finished before the Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(dist, "import_ray", lambda: AlreadyUp)
    monkeypatch.setattr(dist._RayRun, "start_actors", lambda self, **kw: None)
    monkeypatch.setattr(dist._RayRun, "render", interrupted_render)
    jobs = four_jobs()
    with pytest.raises(KeyboardInterrupt):
        dist.render_jobs_ray(jobs, tmp_path, model="embedded", preset=None, progress=False)
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["pending"] == [j.name for j in jobs[1:]]
