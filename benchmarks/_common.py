"""Shared benchmark plumbing: model shapes, timing, environment record, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Shape:
    name: str
    frames: int
    height: int
    width: int
    heads: int
    text: int = 0
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width + self.text


#: docs/models.md#grids (grids in patch tokens)
SHAPES = {
    "wan2.1-480p": Shape("wan2.1-480p", 21, 30, 52, 12),
    "wan2.1-720p": Shape("wan2.1-720p", 21, 45, 80, 40),
    "hunyuan-720p": Shape("hunyuan-720p", 33, 45, 80, 24, text=256),
}


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["packages"] = package_versions()
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
    return env


#: on CUDA, a call at least this long (ms) is timed with a few CUDA-event repetitions instead of do_bench
LONG_CALL_MS = 40.0
#: timed repetitions of a long call (after one more warm-up call)
LONG_CALL_REPS = 3


#: optional packages whose versions every result records (None: not installed)
OPTIONAL_PACKAGES = ("diffusers", "flash-attn-4", "nvidia-cutlass-dsl", "quack-kernels", "comfy-kitchen", "xformers")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in OPTIONAL_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def bench(fn, *, warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: one warm-up call (compiles, autotunes) timed with events; calls under ``LONG_CALL_MS`` then go to
    triton's ``do_bench`` (median); longer ones get one more warm-up and ``LONG_CALL_REPS`` event-timed calls
    (median) — do_bench would spend 5 estimate calls and time a single one for them. CPU: perf_counter.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        first = _event_ms(fn)
        if first < LONG_CALL_MS:
            return float(do_bench(fn, warmup=max(25, warmup), rep=max(100, rep * 10), return_mode="median"))
        second = _event_ms(fn)
        if second < LONG_CALL_MS:  # the first call was compile / autotune time
            return float(do_bench(fn, warmup=max(25, warmup), rep=max(100, rep * 10), return_mode="median"))
        return statistics.median(_event_ms(fn) for _ in range(LONG_CALL_REPS))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _event_ms(fn) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def write_json(name: str, payload: dict, folder: Path | None = None) -> Path:
    """Write ``<folder>/<name>-<gpu>.json`` atomically (``folder`` defaults to ``benchmarks/results``)."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gpu = (payload.get("environment", {}).get("gpu") or "cpu").replace(" ", "_")
    path = folder / f"{name}-{gpu}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)
