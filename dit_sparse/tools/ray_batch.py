"""Data-parallel batch rendering over a Ray cluster: ``dit-sparse render --ray [ADDRESS]``.

The jobs of a job file are spread over Ray actors, each holding one loaded pipeline (a
:class:`~dit_sparse.tools.render.Renderer`): one actor per GPU (``num_gpus=1``), or on CPU-only clusters ``actors``
actors with ``num_cpus=1``. Outputs, sidecars, resume and failures are those of
:func:`~dit_sparse.tools.render.render_jobs`:

* the driver decides which jobs are pending (sidecar missing) and hands each one to an idle actor;
* the *actor* renders it and writes media + sidecar atomically into the output folder (via
  :func:`~dit_sparse.tools.render.render_job`), so on a multi-node cluster ``out_dir`` must be **shared storage**
  mounted at the same absolute path on every node (NFS, a FUSE bucket mount, ...) and on the driver's machine
  (it reads the sidecars to resume; also with ``ray://`` from outside the cluster), and every node needs
  ``dit_sparse`` installed and the model loadable (the same local path, or the hub cache);
* the driver collects the result entries and writes the run summary atomically, in job order, at the start and
  after every finished job (:class:`~dit_sparse.tools.outputs.RunLog`: ``runs/<run>.json`` and ``run_summary.json``);
  a tqdm bar over jobs shows the progress;
* a rerun compares each finished job's settings with its sidecar's as a local run does: the same settings are
  skipped, other ones refused unless ``force``.

Retry semantics. A job whose own code raises (unknown preset, CUDA OOM caught as an exception, ...) is recorded
as ``failed`` with its error and is *not* retried, exactly like a local run. A job is resubmitted only when its
actor died (``RayActorError``: process crash, ``ray.kill``, node loss, OOM kill): the dead actor is killed for
good, and the job goes back to the front of the queue for the next idle actor, at most ``max_retries`` times
(then it is recorded as failed with the actor error). Before resubmitting, the driver checks the sidecar: a job
the dead actor finished but could not report is recorded as done, never rendered twice. A replacement actor is
started for each dead one while jobs remain (at most ``max_retries`` x the actor count in total, and at most
``max_retries`` replacements in a row that fail to start), so no job is lost. The entry of a resubmitted job in
``run_summary.json`` has ``"attempts"``. A driver that dies takes its actors with it; rerun to resume.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import socket
import sys
import uuid
from pathlib import Path

import torch

from .outputs import RunLog, job_settings, plan_outputs
from .render import (
    DEFAULT_MODEL,
    Job,
    Renderer,
    folder_rules,
    is_rendered,
    job_entry,
    job_outputs,
    job_preset,
    media_suffix,
    model_default_preset,
    prepare_out_dir,
    render_job,
    skipped_entry,
)

__all__ = ["render_jobs_ray", "RenderWorker", "RAY_INSTALL_HINT", "MAX_RETRIES"]

RAY_INSTALL_HINT = "pip install 'dit_sparse[ray]'"
#: resubmissions of one job after its actor died
MAX_RETRIES = 3


def import_ray():
    """``ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"rendering on a Ray cluster (--ray) needs Ray, which is not installed: "
                          f"{RAY_INSTALL_HINT} ({e})") from None
    return ray


class RenderWorker:
    """The body of one Ray actor: a loaded pipeline that renders jobs into the (shared) output folder."""

    def __init__(self, factory):
        _quiet_loading()  # per-component loading bars of every actor would garble the driver's job bar
        self.renderer = factory()

    def info(self) -> dict:
        return {"suffix": self.renderer.suffix, "pid": os.getpid(), "host": socket.gethostname(),
                "rules": self.renderer.rules}

    def default_preset(self) -> str:
        return model_default_preset(self.renderer)

    def render(self, job: Job, out_dir: str, default_preset: str | None, fps: int) -> dict:
        return render_job(self.renderer, job, Path(out_dir), default_preset=default_preset, fps=fps)


def _quiet_loading() -> None:
    try:
        import diffusers.utils.logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        import transformers.utils.logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"dit-sparse: {msg}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def render_jobs_ray(jobs: list[Job], out_dir: str | Path, *, model: str = DEFAULT_MODEL, preset: str | None = None,
                    address: str | None = None, actors: int | None = None, device: str | None = None,
                    dtype: torch.dtype = torch.float32, fps: int = 8, progress: bool = True,
                    max_retries: int = MAX_RETRIES, renderer_factory=None, force: bool = False, rules=None,
                    run_log: RunLog | None = None) -> dict:
    """Render ``jobs`` into ``out_dir`` on Ray actors; returns (and writes) the run summary of ``render_jobs``.

    Args:
        jobs: the jobs (:func:`~dit_sparse.tools.render.load_jobs`).
        out_dir: output folder; shared storage at the same path on every node of a multi-node cluster.
        model: ``"embedded"``, or a diffusers folder / hub id every node can load.
        preset: preset for jobs without their own: a name, ``"none"``/``"dense"`` for stock attention, or None
            for the model's default preset (as the CLI's ``--preset``).
        address: None starts (or attaches to) a local Ray instance; ``"auto"`` or ``"ray://host:10001"``
            connects to a cluster. Ignored when Ray is already initialised in this process (then Ray is also
            left running at the end; an instance started here is shut down).
        actors: number of actors; default one per GPU (``device`` cuda), or one per CPU on CPU-only clusters;
            never more than the pending jobs.
        device: ``"cuda"`` (each actor gets its own GPU as ``cuda``) or ``"cpu"``; None: cuda when the cluster
            has GPUs.
        dtype, fps: as for a local run.
        progress: tqdm bar over jobs and a few status lines on stderr.
        max_retries: resubmissions of a job after its actor died.
        renderer_factory: picklable zero-argument callable that builds the renderer inside an actor (custom
            pipelines, tests); default ``Renderer(model, device=device, dtype=dtype)``.
        force: render every job again (a finished job with other settings is otherwise a ``JobError``).
        rules: the model's :class:`~dit_sparse.tools.model_rules.ModelRules` (fills the defaults into the settings
            a rerun compares); default: read from the model folder.
        run_log: the run summary (:class:`~dit_sparse.tools.outputs.RunLog`); default: one started here.

    Raises:
        ImportError: Ray is not installed. RuntimeError: no actor could load the model. LookupError: no default
        preset for the model (pass one).
    """
    ray = import_ray()
    run = _RayRun(ray, jobs, Path(out_dir), model=model, preset=preset, fps=fps, progress=progress,
                  max_retries=max_retries, force=force, rules=rules, dtype=dtype)
    if not run.pending:  # every job finished already: no cluster needed
        _say(progress, f"all {len(jobs)} jobs already rendered in {run.out_dir}")
        with run.open_log(run_log):
            return run.summary(state="finished")
    with run.open_log(run_log):
        return _render_on_ray(ray, run, address=address, actors=actors, device=device, dtype=dtype,
                              progress=progress, renderer_factory=renderer_factory)


def _render_on_ray(ray, run, *, address, actors, device, dtype, progress, renderer_factory) -> dict:
    started_ray = not ray.is_initialized()
    if started_ray:
        import logging

        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=progress)
    elif address is not None:
        _say(progress, f"Ray is already initialised in this process: --ray {address} is ignored")
    try:
        run.start_actors(actors=actors, device=device, dtype=dtype, renderer_factory=renderer_factory)
        return run.render()
    except KeyboardInterrupt:  # as a local run: the summary says interrupted and names the pending jobs
        run.summary(state="interrupted")
        raise
    finally:
        run.kill_all()
        if started_ray:
            ray.shutdown()


class _RayRun:
    """State of one distributed run, in the driver: pending jobs, actors (starting / idle / busy), results."""

    def __init__(self, ray, jobs, out_dir: Path, *, model, preset, fps, progress, max_retries, force, rules, dtype):
        self.ray, self.jobs, self.fps, self.progress, self.max_retries = ray, jobs, fps, progress, max_retries
        self.force, self.dtype, self.log = force, str(dtype), None
        self.out_dir = prepare_out_dir(out_dir.resolve())
        self.model = str(Path(model).resolve()) if model != DEFAULT_MODEL and Path(model).exists() else model
        self.results: dict[int, dict] = {}
        # the preset of jobs without their own; None: the model's default, asked from a loaded pipeline
        self.preset = preset
        if preset is None and model == DEFAULT_MODEL:
            from ..integration.pipelines.presets import TINY_DEFAULT_PRESET

            self.preset = TINY_DEFAULT_PRESET
        # which jobs are pending is decided before any model is loaded when the media suffix can be read from the
        # model folder; otherwise (a hub id) once the first actor has loaded the pipeline
        self.suffix = media_suffix(self.model)
        # the model's rules fill its defaults into the settings a rerun compares; a hub id's come from an actor
        self.rules = rules if rules is not None else folder_rules(self.model)
        self.pending = self._pending() if self.suffix is not None else list(range(len(jobs)))
        self.actors: list = []  # every actor started, for the final clean-up
        self.starting: dict = {}  # info ref -> actor, until the actor has loaded its pipeline
        self.idle: list = []
        self.live: set = set()
        self.start_error: str | None = None

    # -- results -------------------------------------------------------------------------------------------------
    def open_log(self, log: RunLog | None) -> RunLog:
        self.log = log if log is not None else RunLog(self.out_dir, self.jobs)
        return self.log

    def summary(self, state: str = "running") -> dict:
        """Write the run summary (:class:`~dit_sparse.tools.outputs.RunLog`): ``state`` ``"interrupted"`` (Ctrl-C)
        marks the run, and the jobs not finished are listed under ``pending``."""
        return self.log.write([self.results[i] for i in sorted(self.results)], state=state)

    def _pending(self) -> list[int]:
        """The jobs to render; a finished job whose sidecar records other settings is a ``JobError`` unless
        ``force``. Decided when the suffix is known and, unless ``force``, the preset and the rules too."""
        self.results.clear()
        if not self.force and (self.preset is None and any(j.preset is None for j in self.jobs)
                               or self.rules is None):
            return list(range(len(self.jobs)))  # decided again once the first actor has loaded the pipeline

        def settings_of(job):
            return job_settings(job, job_preset(job, self.preset), rules=self.rules, model=self.model,
                                dtype=self.dtype, fps=self.fps, video=self.suffix == ".mp4")

        skip = plan_outputs(self.jobs, self.out_dir, self.suffix, settings_of, force=self.force)
        todo = []
        for i, job in enumerate(self.jobs):
            if not skip[i]:
                todo.append(i)
                continue
            self.results[i] = skipped_entry(job, self.preset, self.suffix)
            if self.preset is None and job.preset is None:  # the model's default is unknown here: the one it used
                try:
                    side = job_outputs(job, self.out_dir, self.suffix)[1]
                    self.results[i]["preset"] = json.loads(side.read_text())["preset"]
                except (OSError, ValueError, KeyError, TypeError):
                    pass
        return todo

    def _entry(self, i: int, **fields) -> dict:
        return job_entry(self.jobs[i], self.preset, self.suffix, **fields)

    # -- actors --------------------------------------------------------------------------------------------------
    def start_actors(self, *, actors, device, dtype, renderer_factory) -> None:
        ray = self.ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if device is None:
            device = "cuda" if gpus else "cpu"
        on_gpu = device.startswith("cuda")
        if on_gpu:
            if not gpus:
                raise RuntimeError(f"device {device!r} but the Ray cluster has no GPUs; use --device cpu")
            device = "cuda"  # Ray sets CUDA_VISIBLE_DEVICES per actor: its one GPU is always cuda:0
        capacity = gpus if on_gpu else max(1, cpus)
        self.target = max(1, min(actors or capacity, len(self.pending)))
        kind = "num_gpus" if on_gpu else "num_cpus"
        if self.target > capacity:
            _say(True, f"{self.target} actors requested but the cluster has {capacity} {kind[4:].upper()}s: the "
                       "extra actors wait for resources")
        self.factory = renderer_factory or functools.partial(Renderer, self.model, device=device, dtype=dtype,
                                                             progress=False)
        self.actor_cls = ray.remote(max_restarts=0, max_task_retries=0, **{kind: 1})(RenderWorker)
        self.run_id = uuid.uuid4().hex[:8]
        self.replacements_left = self.max_retries * self.target
        self.start_failures = 0
        _say(self.progress, f"Ray cluster: {gpus} GPUs, {cpus} CPUs; starting {self.target} actor(s) with "
                            f"{kind}=1 each, model {self.model!r} on {device}")
        for _ in range(self.target):
            self._start_actor()

    def _start_actor(self) -> None:
        name = f"dit-sparse-render-{self.run_id}-{len(self.actors)}"
        actor = self.actor_cls.options(name=name).remote(self.factory)
        self.actors.append(actor)
        self.starting[actor.info.remote()] = actor

    def _replace(self) -> bool:
        """Start a replacement actor, within the budgets; False when none may be started."""
        if self.replacements_left <= 0 or self.start_failures >= self.max_retries:
            return False
        self.replacements_left -= 1
        self._start_actor()
        return True

    def _kill(self, actor) -> None:
        self.live.discard(actor)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass

    def kill_all(self) -> None:
        for actor in self.actors:
            self._kill(actor)

    def _started(self, ref) -> bool:
        """Collect a starting actor's ``info`` call: True when it loaded its pipeline (it is then idle)."""
        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.start_error, self.start_failures = str(e), self.start_failures + 1
            self._kill(actor)
            return False
        self.start_failures = 0
        self.live.add(actor)
        self.idle.append(actor)
        if info["suffix"] != self.suffix or self.rules is None:  # not known (or not right) without a pipeline
            self.suffix, self.rules = info["suffix"], self.rules if self.rules is not None else info["rules"]
            self.pending = self._pending()
        return True

    # -- the run -------------------------------------------------------------------------------------------------
    def render(self) -> dict:
        from tqdm.auto import tqdm

        ray = self.ray
        # the first actor that loads its pipeline tells the media suffix and the model's default preset
        while not self.idle:
            if not self.starting:
                raise RuntimeError(f"no Ray actor could load the model {self.model!r}: {self.start_error}")
            (ref,), _ = ray.wait(list(self.starting), num_returns=1)
            self._started(ref)
        if self.preset is None:
            try:
                self.preset = ray.get(self.idle[0].default_preset.remote())
            except LookupError as e:
                raise LookupError(str(getattr(e, "cause", e))) from None
            _say(self.progress, f"no --preset given, using {self.preset!r}")
            self.pending = self._pending()  # the settings a rerun compares are known only now
        for _ in range(len(self.live) + len(self.starting) - max(1, len(self.pending))):  # fewer jobs than actors
            if self.starting:
                self._kill(self.starting.pop(next(iter(self.starting))))

        queue = collections.deque(self.pending)
        busy: dict = {}  # render ref -> (actor, job index)
        deaths: collections.Counter = collections.Counter()
        bar = tqdm(total=len(self.jobs), initial=len(self.results), desc="jobs", unit="job",
                   disable=not self.progress)

        def finish(i: int, entry: dict) -> None:
            if deaths[i]:
                entry["attempts"] = deaths[i] + 1
            self.results[i] = entry
            bar.update(1)
            bar.set_postfix_str(self.jobs[i].name[:40])
            self.summary()

        while queue or busy:
            while queue and self.idle:
                actor, i = self.idle.pop(), queue.popleft()
                busy[actor.render.remote(self.jobs[i], str(self.out_dir), self.preset, self.fps)] = (actor, i)
            if not busy and not self.starting and not self._replace():  # no actor left, none may be started
                error = f"no live Ray actor left to render this job; last error: {self.start_error}"
                while queue:
                    i = queue.popleft()
                    finish(i, self._entry(i, status="failed", error=error))
                break
            (ref,), _ = ray.wait(list(busy) + list(self.starting), num_returns=1)
            if ref in self.starting:  # a replacement actor finished loading, or failed to
                self._started(ref)
                continue
            actor, i = busy.pop(ref)
            try:
                entry = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # raised outside the job's own try: recorded, not retried
                self.idle.append(actor)
                finish(i, self._entry(i, status="failed", error=_first_line(getattr(e, "cause", None) or e)))
                continue
            except ray.exceptions.RayError as e:  # RayActorError and kin: the actor died (or is unreachable)
                self._kill(actor)  # gone for good: never a second writer of this job's files
                deaths[i] += 1
                self.start_error = _first_line(e)
                self._actor_died(i, deaths[i], queue, finish)
                if queue and len(self.live) + len(self.starting) < self.target:
                    self._replace()
                continue
            self.idle.append(actor)
            finish(i, entry)
        bar.close()
        return self.summary(state="finished")

    def _actor_died(self, i: int, deaths: int, queue, finish) -> None:
        job = self.jobs[i]
        if is_rendered(job, self.out_dir, self.suffix):  # it finished but could not report: done, not redone
            try:
                side = job_outputs(job, self.out_dir, self.suffix)[1]
                seconds = json.loads(side.read_text())["timings"]["job_wall_s"]
            except (OSError, ValueError, KeyError, TypeError):
                seconds = None
            finish(i, self._entry(i, status="done", seconds=seconds))
        elif deaths > self.max_retries:
            finish(i, self._entry(i, status="failed",
                                  error=f"its Ray actor died {deaths} times; last: {self.start_error}"))
        else:
            _say(self.progress, f"the actor rendering {job.name} died ({self.start_error}); rescheduling it "
                                f"(retry {deaths}/{self.max_retries})")
            queue.appendleft(i)
