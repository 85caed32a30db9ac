"""The output folder of a batch render (torch-free): atomic writes, reruns, file name limits, the run summaries.

* Every file is written to a temporary name unique to the process (``.<stem>.partial-<pid>-<host>-<random><suffix>``)
  and renamed into place, so two runs into one folder never share a temporary file, and a later run removes only the
  temporary files of processes that are gone (``os.kill(pid, 0)``, same host).
* A job is rendered when its sidecar and media exist. The sidecar stores the settings that determine the output
  (:func:`job_settings`); a rerun of the same name with other settings is refused (:func:`plan_outputs`) unless
  ``force``, and the same settings are skipped.
* :class:`RunLog` is one run's summary: ``runs/<run>.json`` (this run only, written atomically at the start with
  ``"state": "running"``, after every job, and at the end) and a copy in ``run_summary.json`` while this run holds the
  folder's lock (a concurrent run writes its own ``runs/<run>.json`` only). A run that finds a ``running`` summary of
  a process that is gone says so once and marks it ``killed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sys
import time
from pathlib import Path

from . import interrupts
from .jobs import JobError, SetupError

__all__ = ["write_atomic", "temp_name", "job_outputs", "check_name_lengths", "job_settings", "plan_outputs",
           "RunLog", "SummaryError", "clean_stale", "RUNS_DIR", "SUMMARY"]

SUMMARY = "run_summary.json"
RUNS_DIR = "runs"
LOCK = ".dit_sparse.lock"
#: a short tag of this host: a temporary file of a process on another node of a shared folder is never removed here
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_PID_DIGITS = 10  # room for any pid in the name-length budget
_PARTIAL = re.compile(r"\.partial-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}")


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under: unique per process and call, suffix kept (writers pick the
    format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.partial-{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}{path.suffix}")


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers never see a half-written file, and ``path`` is left as
    it was when the write fails. A Ctrl-C during the clean-up is held until the temporary file is gone."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with interrupts.deferred():
            if tmp.exists():
                tmp.unlink()


def job_outputs(job, out_dir: Path, suffix: str) -> tuple[Path, Path]:
    """``(media, sidecar)`` paths of ``job`` in ``out_dir``."""
    out_dir = Path(out_dir)
    return out_dir / f"{job.name}{suffix}", out_dir / f"{job.name}.json"


def _reserved(extra_stem: str) -> int:
    """Bytes a job's longest file name adds to its name: its temporary sidecar ``.<name><extra>.partial-...json``."""
    return len(f".{extra_stem}.partial-{'9' * _PID_DIGITS}-{HOST_TAG}-{'0' * 8}.json")


def check_name_lengths(jobs, out_dir: str | Path, *, extra_stem: str = "") -> None:
    """Every job's files fit the file system's name limit (``PC_NAME_MAX``, else 255 bytes), before any model loads."""
    try:
        limit = os.pathconf(out_dir, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    reserved = _reserved(extra_stem)
    for job in jobs:
        n = len(job.name.encode())
        if n + reserved > limit:
            loc = "--name" if job.where == "command line" else f"{job.where}: name"
            raise JobError(f"{loc}: {n} bytes is too long: file names in {str(out_dir)!r} have at most {limit} bytes "
                           f"and this job's temporary sidecar '.{job.name[:12]}...{extra_stem}.partial-<pid>-...json' "
                           f"adds {reserved}; use a name of at most {limit - reserved} bytes")


def _canonical_model(model: str) -> str:
    from .model_rules import is_embedded_folder

    if model == "embedded" or is_embedded_folder(model):
        return "embedded"
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def job_settings(job, preset, *, rules, model: str, dtype: str, fps: int, video: bool, min_tokens=None) -> dict:
    """The settings that determine a job's output, as stored in its sidecar (``"settings"``) and compared on rerun:
    prompt, negative prompt, seed, steps, frames, size, guidance (the model's defaults filled in where ``rules`` know
    them), preset, pipeline kwargs, model, dtype, (video) fps and a ``--min-tokens`` override. The device is not one
    of them."""
    keys = ("steps", "frames", "height", "width", "guidance_scale")
    v = rules.resolve(job) if rules is not None else {k: getattr(job, k) for k in keys}
    s = {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed,
         **{k: v.get(k) for k in keys}, "preset": preset,
         "pipeline_kwargs": job.extra.get("pipeline_kwargs", {}), "model": _canonical_model(model),
         "dtype": str(dtype).removeprefix("torch.")}
    if video:
        s["fps"] = fps
    if min_tokens is not None and preset is not None:  # --min-tokens: only when given (older sidecars match)
        s["min_tokens"] = min_tokens
    return json.loads(json.dumps(s, default=str))


def _shown(key: str, v) -> str:
    if v is None:
        return "none (stock attention)" if key == "preset" else "default"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(side: Path, wanted: dict) -> list[tuple[str, object, object]]:
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        return [("sidecar", "unreadable", "a readable one")]
    stored = meta.get("settings") if isinstance(meta, dict) else None
    if stored is None:  # a sidecar of an earlier version: the settings it records at its top level
        stored = {k: meta.get(k) for k in ("prompt", "seed", "steps", "frames", "height", "width", "guidance_scale",
                                           "preset", "dtype") if k in meta}
        wanted = {k: v for k, v in wanted.items() if k in stored and v is not None}
    return [(k, stored.get(k), v) for k, v in wanted.items() if stored.get(k) != v]


def plan_outputs(jobs, out_dir: str | Path, suffix: str, settings_of, *, force: bool = False) -> list[bool]:
    """Which ``jobs`` are already rendered (True: skip). A rendered job whose sidecar records other settings than
    ``settings_of(job)`` is a :class:`JobError` naming what differs, unless ``force`` (then it is rendered again)."""
    skip = []
    for job in jobs:
        media, side = job_outputs(job, Path(out_dir), suffix)
        if force or not (side.exists() and media.exists()):
            skip.append(False)
            continue
        diffs = _differences(side, settings_of(job))
        if diffs:
            had = ", ".join(f"{k}={_shown(k, a)}" for k, a, _ in diffs)
            asks = ", ".join(f"{k}={_shown(k, b)}" for k, _, b in diffs)
            loc, other = (("", "another --name") if job.where == "command line" else
                          (f"{job.where}: ", "another name for the job"))
            raise JobError(f"{loc}{media} was rendered with {had}, this job asks {asks}; pass --force to re-render "
                           f"or use {other}")
        skip.append(True)
    return skip


# -- the run summaries -------------------------------------------------------------------------------------------
class SummaryError(SetupError):
    """A run summary could not be written (disk full, ...): the message says what was kept."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _compile_times() -> dict[str, float]:
    """First-call seconds of the compiled backend's compilations in this process (``{signature: s}``), read only
    when the engine is loaded already (this module stays torch-free)."""
    mod = sys.modules.get("dit_sparse.backends.compiled")
    return {} if mod is None else {k: round(v, 3) for k, v in mod.compile_times().items()}


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str) + "\n"))


def clean_stale(out_dir: Path) -> tuple[list[Path], list[tuple[Path, dict]]]:
    """Remove the temporary files of processes that are gone (same host; files of an earlier version's fixed
    names too) and mark ``running`` summaries of such processes ``killed``. Returns ``(removed, unfinished)``."""
    removed = []
    for folder in (out_dir, out_dir / RUNS_DIR):
        for f in folder.glob(".*.partial*"):
            m = _PARTIAL.search(f.name)
            if m is None or (m.group(2) == HOST_TAG and int(m.group(1)) != os.getpid()
                             and not _alive(int(m.group(1)))):
                f.unlink(missing_ok=True)
                removed.append(f)
    unfinished = []
    for f in sorted((out_dir / RUNS_DIR).glob("*.json")):
        try:
            s = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(s, dict) and s.get("state") == "running" and s.get("host_tag") == HOST_TAG
                and s.get("pid") != os.getpid() and isinstance(s.get("pid"), int) and not _alive(s["pid"])):
            s.update(state="killed", finished=False, interrupted=True, current=None)
            try:
                _write_json(f, s)
            except OSError:
                pass
            unfinished.append((f, s))
    return removed, unfinished


class RunLog:
    """One run's summary (see the module docstring). ``say`` prints a line (the unfinished runs found)."""

    def __init__(self, out_dir: str | Path, jobs, *, say=None):
        self.out_dir = Path(out_dir)
        (self.out_dir / RUNS_DIR).mkdir(parents=True, exist_ok=True)
        self.jobs = list(jobs)
        self.run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}-{secrets.token_hex(2)}"
        self.own = self.out_dir / RUNS_DIR / f"{self.run}.json"
        self.writes_shared = self._take_lock()
        removed, unfinished = clean_stale(self.out_dir)
        for f, s in unfinished:
            if say is not None:
                pending = s.get("pending") or []
                say(f"the last run in {self.out_dir}/ did not finish (pid {s['pid']} is gone; {RUNS_DIR}/{f.name}): "
                    f"{len(pending)} job(s) were pending: {', '.join(pending) or 'none'}; removed "
                    f"{len(removed)} temporary file(s) it left")
        if say is not None and not self.writes_shared:
            say(f"another dit-sparse run is writing into {self.out_dir}/: this run's summary is "
                f"{RUNS_DIR}/{self.run}.json only ({SUMMARY} is that run's)")
        self.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.state = None
        self.results: list[dict] = []
        self.write([], state="running")

    def _take_lock(self) -> bool:
        """This run writes ``run_summary.json`` when it gets the folder's lock (held until :meth:`close`; the
        system drops it when the process dies)."""
        self._fd = None
        try:
            import fcntl
        except ImportError:  # no flock: this run writes run_summary.json too
            return True
        fd = os.open(self.out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def write(self, results: list[dict], *, state: str = "running", current: str | None = None,
              error: str | None = None) -> dict:
        """Write this run's summary atomically (``runs/<run>.json``, and ``run_summary.json`` while this run holds
        the lock); raises :class:`SummaryError` (what was kept) when it cannot be written. A Ctrl-C while it
        writes is raised once both files are written."""
        with interrupts.deferred():
            return self._write(results, state=state, current=current, error=error)

    def _write(self, results, *, state, current, error) -> dict:
        self.results, self.state = list(results), state
        names = {r["name"] for r in results}
        count = {s: sum(r["status"].startswith(s) for r in results) for s in ("done", "skipped", "failed")}
        summary = {"run": self.run, "state": state, "finished": state == "finished",
                   "interrupted": state in ("interrupted", "killed"), "pid": os.getpid(), "host_tag": HOST_TAG,
                   "started": self.started, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "jobs": len(self.jobs), **count, "current": current,
                   "pending": [j.name for j in self.jobs if j.name not in names], "results": list(results)}
        compiles = _compile_times()
        if compiles:
            summary["compile_s"] = compiles
        if error is not None:
            summary["error"] = error
        for path in (self.own, self.out_dir / SUMMARY if self.writes_shared else None):
            if path is None:
                continue
            try:
                _write_json(path, summary)
            except OSError as e:
                done = [r["name"] for r in results if r["status"] == "done"]
                kept = (f"{len(done)} job(s) rendered in this run are kept ({', '.join(done[:5])}"
                        f"{', ...' if len(done) > 5 else ''})" if done else "no job was rendered in this run")
                raise SummaryError(f"could not write {path} ({e.strerror or e}): {kept}; the previous "
                                   f"{path.name} is left as it was; free space and rerun the same command "
                                   "(finished jobs are skipped)") from None
        return summary

    def close(self, state: str, error: str | None = None) -> dict | None:
        """End the run with ``state`` (``finished``, ``interrupted``, ``failed``) unless it has ended already."""
        out = None
        try:
            if self.state == "running":
                out = self.write(self.results, state=state, error=error)
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd, self.writes_shared = None, False
        return out

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.state != "running":
            self.close("finished")
            return
        state = "interrupted" if kind is KeyboardInterrupt else "failed" if kind is not None else "finished"
        try:
            self.close(state, error=None if exc is None else f"{type(exc).__name__}: {exc}")
        except SummaryError:
            if kind is None:
                raise
