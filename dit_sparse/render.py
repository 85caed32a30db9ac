"""Batch rendering behind ``dit-sparse render`` / ``compare``: jobs, atomic outputs, sidecars, resume, failures.

A job renders one prompt to ``<out>/<name>.mp4`` (video models) or ``<name>.png`` (image models) plus a JSON
sidecar ``<name>.json``. The media file is written to a temporary name and renamed into place; the sidecar is
written the same way, *after* the media: a job is done exactly when its sidecar exists, so an interrupted run
never leaves a truncated file that counts as done, and a rerun skips finished jobs and redoes the rest. A
failing job is recorded in ``run_summary.json`` with its error; the others continue.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["Job", "load_jobs", "Renderer", "write_atomic", "side_by_side", "library_versions", "render_jobs",
           "render_job", "is_rendered", "media_suffix", "model_default_preset"]

DEFAULT_MODEL = "embedded"


@dataclass
class Job:
    """One render. ``None`` fields take the model's defaults."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    preset: str | None = None
    name: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"job prompt must be a non-empty string, got {self.prompt!r}")
        if self.name is None:
            slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:60] or "job"
            self.name = f"{slug}-s{self.seed}" + (f"-{self.preset.replace(':', '_')}" if self.preset else "")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.name):
            raise ValueError(f"job name {self.name!r} may only use letters, digits, '.', '_' and '-'")

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        aliases = {"output": "name", "output_name": "name", "num_frames": "frames", "num_inference_steps": "steps",
                   "size": None}
        kwargs, extra = {}, {}
        for k, v in d.items():
            if k == "size" and v is not None:  # "WxH" or [W, H]
                w, h = (v.lower().split("x") if isinstance(v, str) else v)
                kwargs["width"], kwargs["height"] = int(w), int(h)
            elif k in known:
                kwargs[k] = v
            elif aliases.get(k):
                kwargs[aliases[k]] = v
            else:
                extra[k] = v
        return cls(**kwargs, extra=extra)


def load_jobs(path: str | Path) -> list[Job]:
    """Jobs from a JSONL file (one object per line) or a YAML file (a list, or ``{jobs: [...]}``)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
        items = data.get("jobs", data) if isinstance(data, dict) else data
    else:
        items = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); a job file has one JSON object "
                                     "per line") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path} holds no jobs; expected a list of objects with at least a 'prompt'")
    jobs = [Job.from_dict(d) for d in items]
    names = [j.name for j in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{path}: jobs share output names {dupes}; give them distinct 'name' fields")
    return jobs


def write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def library_versions() -> dict:
    import diffusers

    import dit_sparse

    out = {"dit_sparse": dit_sparse.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "python": platform.python_version()}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def side_by_side(left, right, gap: int = 4) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` (or images) placed left | right with a white gap."""
    a, b = np.asarray(left), np.asarray(right)
    gap_shape = list(a.shape)
    gap_shape[-2] = gap
    return np.concatenate([a, np.ones(gap_shape, dtype=a.dtype), b], axis=-2)


def save_media(frames, path: Path, fps: int = 8) -> None:
    """mp4 for ``[F, H, W, 3]`` frames (F > 1), png otherwise; atomic."""
    arr = np.clip(np.asarray(frames), 0.0, 1.0)
    if path.suffix == ".png":
        from PIL import Image

        img = arr[0] if arr.ndim == 4 else arr
        write_atomic(path, lambda p: Image.fromarray((img * 255).round().astype(np.uint8)).save(p, format="PNG"))
        return
    from diffusers.utils import export_to_video

    write_atomic(path, lambda p: export_to_video(list(arr), str(p), fps=fps, macro_block_size=1))


def _is_video(pipeline_class: str, vae_class: str | None) -> bool:
    return (vae_class is not None and "Video" in vae_class) or "Wan" in pipeline_class or "Video" in pipeline_class


def media_suffix(model: str) -> str | None:
    """The output suffix (``.mp4`` / ``.png``) a :class:`Renderer` of ``model`` uses, read from the folder's
    ``model_index.json`` without loading weights; None when that file is not at hand (e.g. a hub id)."""
    if model == DEFAULT_MODEL:
        from .tiny_model import ASSET_DIR as folder
    else:
        folder = Path(model)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    vae = index.get("vae")
    vae_class = vae[1] if isinstance(vae, list) and len(vae) == 2 and vae[1] else None
    return ".mp4" if _is_video(str(index.get("_class_name", "")), vae_class) else ".png"


def model_default_preset(renderer: Renderer) -> str:
    """The preset used when none is requested: the tiny model's tuned one, else the first preset of the loaded
    transformer's family. Raises ``LookupError`` when the family has none."""
    if renderer.model == DEFAULT_MODEL:
        from .pipelines.presets import TINY_DEFAULT_PRESET

        return TINY_DEFAULT_PRESET
    from .integration import transformers_of
    from .pipelines.presets import FAMILY_TRANSFORMERS, list_presets

    cls = type(transformers_of(renderer.pipe)[0][1]).__name__
    family = next((f for f, c in FAMILY_TRANSFORMERS.items() if c == cls), None)
    options = list_presets(family) if family else []
    if not options:
        raise LookupError(f"no preset for {cls}; pass --preset (see `dit-sparse presets`) or --preset none")
    return options[0].name


class Renderer:
    """Loads one pipeline and renders jobs on it, switching presets per job.

    Args:
        model (`str`): ``"embedded"`` (the shipped tiny model) or a diffusers pipeline folder / hub id.
        device, dtype: where and in what precision to run.
        progress (`bool`): show diffusers' per-step progress bars.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = True):
        from .integration import apply, get_runtime, remove, transformers_of

        self._apply, self._remove, self._runtime, self._transformers = apply, remove, get_runtime, transformers_of
        self.model = model
        self.device = device
        if model == DEFAULT_MODEL:
            from .tiny_model import DEFAULT_CALL, DEFAULT_NEGATIVE_PROMPT, build_pipeline

            self.pipe = build_pipeline()
            c = DEFAULT_CALL
            self.defaults = {"steps": c["num_inference_steps"], "frames": c["num_frames"], "height": c["height"],
                             "width": c["width"], "guidance_scale": c["guidance_scale"],
                             "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
                             "pipeline_kwargs": {"max_sequence_length": c["max_sequence_length"]}}
        else:
            from .pipelines import load_pipeline

            self.pipe = load_pipeline(model, torch_dtype=dtype)
            self.defaults = {}
        self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self.is_video = _is_video(type(self.pipe).__name__,
                                  type(self.pipe.vae).__name__ if hasattr(self.pipe, "vae") else None)

    @property
    def suffix(self) -> str:
        return ".mp4" if self.is_video else ".png"

    def _call_kwargs(self, job: Job) -> dict:
        d = self.defaults
        kw = {"prompt": job.prompt, "num_inference_steps": job.steps or d.get("steps", 20),
              "generator": torch.Generator("cpu").manual_seed(job.seed), "output_type": "np"}
        for key, attr in (("height", "height"), ("width", "width"), ("guidance_scale", "guidance_scale")):
            val = getattr(job, attr) if getattr(job, attr) is not None else d.get(attr)
            if val is not None:
                kw[key] = val
        if self.is_video:
            frames = job.frames or d.get("frames")
            if frames is not None:
                kw["num_frames"] = frames
        neg = job.negative_prompt if job.negative_prompt is not None else d.get("negative_prompt")
        if neg is not None:
            kw["negative_prompt"] = neg
        kw.update(d.get("pipeline_kwargs", {}))
        kw.update(job.extra.get("pipeline_kwargs", {}))
        return kw

    def latent_grid(self, call_kwargs: dict) -> tuple[int, int, int]:
        """Latent grid in patch tokens that a call with ``call_kwargs`` produces (Wan-style video pipelines)."""
        pipe = self.pipe
        st = getattr(pipe, "vae_scale_factor_temporal", None)
        ss = getattr(pipe, "vae_scale_factor_spatial", None)
        if st is None or ss is None:
            raise NotImplementedError(f"latent_grid knows Wan-style pipelines only, not {type(pipe).__name__}")
        pt, ph, pw = pipe.transformer.config.patch_size
        frames = (call_kwargs["num_frames"] - 1) // st + 1
        return (-(-frames // pt), call_kwargs["height"] // ss // ph, call_kwargs["width"] // ss // pw)

    def generate(self, job: Job, preset, *, record_masks: bool = False):
        """Run one job with ``preset`` (a preset name or a ``SparseAttentionConfig``; None = stock attention).

        Returns ``(frames, seconds, summary, call_kwargs)``; ``summary`` has the measured density and attention
        call counts (None for stock attention).
        """
        if preset is not None:
            for rt in self._apply(self.pipe, preset):
                rt.record_masks = record_masks
        try:
            kw = self._call_kwargs(job)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = self.pipe(**kw)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            summary = None
            if preset is not None:
                runtimes = [self._runtime(tr) for _, tr in self._transformers(self.pipe)]
                runs = [rt.last_run or rt.summary() for rt in runtimes if rt is not None]
                dens = [r["density"] for r in runs if r.get("density") is not None]
                summary = {"density": sum(dens) / len(dens) if dens else None,
                           "attention_calls": {k: sum(r["calls"][k] for r in runs) for k in ("sparse", "dense")},
                           "layer_density": runs[0]["layer_density"] if runs else {}}
                if record_masks:
                    summary["masks"] = runtimes[0].last_masks
        finally:
            if preset is not None:
                self._remove(self.pipe)
        frames = out.frames[0] if hasattr(out, "frames") else np.asarray(out.images[0])[None]
        return np.asarray(frames), seconds, summary, kw

    def sidecar(self, job: Job, preset, kw: dict, seconds: float, summary, wall: float) -> dict:
        from .pipelines.presets import PRESETS

        cfg = PRESETS[preset].config if isinstance(preset, str) and preset in PRESETS else preset
        return {
            "name": job.name, "prompt": job.prompt, "negative_prompt": kw.get("negative_prompt"), "seed": job.seed,
            "steps": kw["num_inference_steps"], "frames": kw.get("num_frames"), "height": kw.get("height"),
            "width": kw.get("width"), "guidance_scale": kw.get("guidance_scale"),
            "model": self.model, "pipeline": type(self.pipe).__name__,
            "preset": preset if isinstance(preset, str) or preset is None else "custom",
            "config": repr(cfg) if cfg is not None else None,
            "timings": {"denoise_and_decode_s": round(seconds, 3), "job_wall_s": round(wall, 3)},
            "measured_density": None if summary is None else summary["density"],
            "attention_calls": None if summary is None else summary["attention_calls"],
            "device": self.device, "versions": library_versions(),
        }


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, lambda p: p.write_text(json.dumps(payload, indent=2, default=str) + "\n"))


def prepare_out_dir(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and remove temporary files left by a run that was killed mid-write."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.partial.*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)
    return out_dir


def job_preset(job: Job, default_preset: str | None):
    """The preset ``job`` renders with: its own, else ``default_preset``; None = stock attention."""
    preset = job.preset if job.preset is not None else default_preset
    return None if preset in (None, "none", "dense") else preset


def job_outputs(job: Job, out_dir: Path, suffix: str) -> tuple[Path, Path]:
    """``(media, sidecar)`` paths of ``job`` in ``out_dir``."""
    return out_dir / f"{job.name}{suffix}", out_dir / f"{job.name}.json"


def is_rendered(job: Job, out_dir: Path, suffix: str) -> bool:
    """A job is done when its sidecar exists (written after the media, both atomically) and its media too."""
    media, side = job_outputs(job, out_dir, suffix)
    return side.exists() and media.exists()


def job_entry(job: Job, default_preset: str | None, suffix: str, **fields) -> dict:
    """The job's line in ``run_summary.json`` (``fields`` add the status and the rest)."""
    return {"name": job.name, "prompt": job.prompt, "preset": job_preset(job, default_preset),
            "output": f"{job.name}{suffix}", **fields}


def skipped_entry(job: Job, default_preset: str | None, suffix: str) -> dict:
    return job_entry(job, default_preset, suffix, status="skipped (already rendered)")


def render_job(renderer: Renderer, job: Job, out_dir: str | Path, *, default_preset: str | None,
               fps: int = 8) -> dict:
    """Render one job into ``out_dir`` (media, then sidecar, both atomic) and return its result entry.

    A job's own error does not propagate: it is returned as a ``"failed"`` entry with the error and traceback.
    Used by :func:`render_jobs` and by the Ray actors of :mod:`dit_sparse.distributed`.
    """
    out_dir = Path(out_dir)
    preset = job_preset(job, default_preset)
    media, side = job_outputs(job, out_dir, renderer.suffix)
    entry = job_entry(job, default_preset, renderer.suffix)
    t0 = time.perf_counter()
    try:
        frames, seconds, stats, kw = renderer.generate(job, preset)
        save_media(frames, media, fps=fps)
        _write_json(side, renderer.sidecar(job, preset, kw, seconds, stats, time.perf_counter() - t0))
        return {**entry, "status": "done", "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as e:  # one bad job must not stop the batch; the error is recorded
        return {**entry, "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=6)}


def render_jobs(renderer: Renderer, jobs: list[Job], out_dir: str | Path, *, default_preset: str | None,
                fps: int = 8, progress: bool = True) -> dict:
    """Render ``jobs`` into ``out_dir``; returns (and writes) the run summary.

    Finished jobs (sidecar present) are skipped; a failing job is recorded with its error and the run goes on.
    ``default_preset`` applies to jobs without their own ``preset`` (None: stock attention).
    :func:`dit_sparse.distributed.render_jobs_ray` does the same over a Ray cluster.
    """
    from tqdm.auto import tqdm

    out_dir = prepare_out_dir(out_dir)
    results = []
    summary_path = out_dir / "run_summary.json"
    bar = tqdm(jobs, desc="jobs", unit="job", disable=not progress)
    for job in bar:
        bar.set_postfix_str(job.name[:40])
        if is_rendered(job, out_dir, renderer.suffix):
            results.append(skipped_entry(job, default_preset, renderer.suffix))
            continue
        results.append(render_job(renderer, job, out_dir, default_preset=default_preset, fps=fps))
        write_summary(summary_path, results, jobs)
    return write_summary(summary_path, results, jobs)


def write_summary(path: Path, results: list[dict], jobs: list[Job]) -> dict:
    """Write ``run_summary.json`` atomically; returns the summary."""
    summary = _summary(results, jobs)
    _write_json(path, summary)
    return summary


def _summary(results: list[dict], jobs: list[Job]) -> dict:
    count = {s: sum(r["status"].startswith(s) for r in results) for s in ("done", "skipped", "failed")}
    return {"jobs": len(jobs), **count, "results": results}


def compare(renderer: Renderer, job: Job, preset: str, out_dir: str | Path, *, fps: int = 8) -> dict:
    """Render ``job`` dense and with ``preset`` (same seed); write a side-by-side file and a JSON report."""
    from .eval import compare_frames

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense, t_dense, _, kw = renderer.generate(job, None)
    sparse, t_sparse, stats, _ = renderer.generate(job, preset)
    metrics = compare_frames(sparse, dense)
    media = out_dir / f"{job.name}-compare{renderer.suffix}"
    save_media(side_by_side(dense, sparse), media, fps=fps)
    report = {"name": job.name, "prompt": job.prompt, "seed": job.seed, "preset": preset,
              "steps": kw["num_inference_steps"], "dense_s": round(t_dense, 3), "sparse_s": round(t_sparse, 3),
              "speedup": t_dense / t_sparse, "measured_density": None if stats is None else stats["density"],
              **metrics, "lpips_note": None if metrics["lpips"] is not None else
              "LPIPS skipped: the lpips package or its weights are not available locally",
              "side_by_side": media.name, "layout": "left: dense, right: sparse", "model": renderer.model,
              "device": renderer.device, "versions": library_versions()}
    _write_json(out_dir / f"{job.name}-compare.json", report)
    return report
