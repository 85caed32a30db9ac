"""Batch rendering behind ``dit-sparse render`` / ``compare``: jobs, atomic outputs, sidecars, resume, failures.

A job renders one prompt to ``<out>/<name>.mp4`` (video models) or ``<name>.png`` (image models) plus a JSON
sidecar ``<name>.json``. The media file is written to a temporary name and renamed into place; the sidecar is
written the same way, *after* the media: a job is done exactly when its sidecar exists, so an interrupted run
never leaves a truncated file that counts as done, and a rerun skips finished jobs (the same settings; other
settings under the same name are refused unless ``force``) and redoes the rest. A failing job is recorded in the
run summary with its error; the others continue. The folder's bookkeeping (temporary names, the settings a rerun
compares, the run summaries) is :mod:`dit_sparse.tools.outputs`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import platform
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from . import interrupts
from .jobs import Job, load_jobs
from .model_rules import ModelRules
from .outputs import RunLog, job_outputs, job_settings, plan_outputs, write_atomic

__all__ = ["Job", "load_jobs", "Renderer", "write_atomic", "side_by_side", "library_versions", "render_jobs",
           "render_job", "is_rendered", "media_suffix", "model_default_preset", "renderer_settings"]

DEFAULT_MODEL = "embedded"


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


def _write_video(frames: np.ndarray, path: Path, fps: int) -> None:
    """diffusers' ``export_to_video`` (the same encoder settings), but the writer is closed also when the writing
    stops (Ctrl-C, an error): ``imageio`` leaves it open then, and its ffmpeg would write the file after
    :func:`write_atomic` removed it (a stray temporary file). Closing waits for ffmpeg; a Ctrl-C meanwhile is held."""
    import imageio

    writer = imageio.get_writer(str(path), fps=fps, quality=5.0, bitrate=None, macro_block_size=1)
    try:
        for frame in frames:
            writer.append_data((frame * 255).astype(np.uint8))
    finally:
        with interrupts.deferred():
            writer.close()


def save_media(frames, path: Path, fps: int = 8) -> None:
    """mp4 for ``[F, H, W, 3]`` frames (F > 1), png otherwise; atomic."""
    arr = np.clip(np.asarray(frames), 0.0, 1.0)
    if path.suffix == ".png":
        from PIL import Image

        img = arr[0] if arr.ndim == 4 else arr
        write_atomic(path, lambda p: Image.fromarray((img * 255).round().astype(np.uint8)).save(p, format="PNG"))
        return
    write_atomic(path, lambda p: _write_video(arr, p, fps))


def _is_video(pipeline_class: str, vae_class: str | None) -> bool:
    return (vae_class is not None and "Video" in vae_class) or "Wan" in pipeline_class or "Video" in pipeline_class


def media_suffix(model: str) -> str | None:
    """The output suffix (``.mp4`` / ``.png``) a :class:`Renderer` of ``model`` uses, read from the folder's
    ``model_index.json`` without loading weights; None when that file is not at hand (e.g. a hub id)."""
    if model == DEFAULT_MODEL:
        from ..tiny.model import ASSET_DIR as folder
    else:
        folder = Path(model)
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    vae = index.get("vae")
    vae_class = vae[1] if isinstance(vae, list) and len(vae) == 2 and vae[1] else None
    return ".mp4" if _is_video(str(index.get("_class_name", "")), vae_class) else ".png"


def model_default_preset(renderer: Renderer, *, with_reason: bool = False):
    """The preset used when none is requested: the embedded model's tuned one, else one chosen from the loaded
    transformer's family and size class (:func:`~dit_sparse.integration.pipelines.presets.default_preset_for`; never a
    toy preset for a real model). ``with_reason`` returns ``(name, why)``. Raises ``LookupError`` when the family
    has none."""
    from ..integration.pipelines.presets import TINY_DEFAULT_PRESET, default_preset_for

    if renderer.model == DEFAULT_MODEL:
        name, why = TINY_DEFAULT_PRESET, "the embedded model's default preset"
    else:
        r = renderer.rules
        name, why = default_preset_for(r.family, r.size_class, experts=r.experts, params=r.params,
                                       what=r.describe())
    return (name, why) if with_reason else name


def rules_of_pipeline(pipe, defaults: dict | None = None) -> ModelRules:
    """:class:`~dit_sparse.tools.model_rules.ModelRules` of a loaded pipeline (its components' configs)."""
    tr = getattr(pipe, "transformer", None)
    tr2 = getattr(pipe, "transformer_2", None)
    vae = getattr(pipe, "vae", None)
    tcfg = dict(tr.config) if tr is not None else {}
    vcfg = {**dict(vae.config), "_class_name": type(vae).__name__} if vae is not None else {}
    return ModelRules.from_configs(type(pipe).__name__, type(tr).__name__ if tr is not None else None, tcfg, vcfg,
                                   experts=2 if tr2 is not None else 1,
                                   defaults=defaults if defaults is not None else call_defaults(type(pipe)))


def folder_rules(model: str) -> ModelRules | None:
    """:class:`~dit_sparse.tools.model_rules.ModelRules` of ``"embedded"`` or a local folder with its render
    defaults: the folder's ``render_defaults.json`` where it has one, else the pipeline class's own call defaults
    (as the CLI reads them before loading); None for a hub id."""
    import dataclasses

    import diffusers

    from .model_rules import read_model_rules

    rules = read_model_rules(model)
    if rules is not None:  # the folder's own render_defaults.json over the pipeline class's call defaults
        cls = getattr(diffusers, rules.pipeline, None)
        if cls is not None:
            rules = dataclasses.replace(rules, defaults={**call_defaults(cls), **rules.defaults})
    return rules


def call_defaults(pipeline_cls) -> dict:
    """The pipeline's own ``__call__`` defaults for steps, frames, size and guidance (None where it has none)."""
    try:
        params = inspect.signature(pipeline_cls.__call__).parameters
    except (TypeError, ValueError):
        return {}
    out = {}
    for key, name in (("steps", "num_inference_steps"), ("frames", "num_frames"), ("height", "height"),
                      ("width", "width"), ("guidance_scale", "guidance_scale")):
        p = params.get(name)
        if p is not None and isinstance(p.default, (int, float)) and not isinstance(p.default, bool):
            out[key] = p.default
    return out


class Renderer:
    """Loads one pipeline and renders jobs on it, switching presets per job.

    Args:
        model (`str`): ``"embedded"`` (the shipped tiny model) or a diffusers pipeline folder / hub id.
        device, dtype: where and in what precision to run.
        progress (`bool`): show diffusers' per-step progress bars.
        min_tokens (`int` or ``"auto"``, *optional*): overrides the presets' ``DensePolicy.min_tokens`` (they use
            ``"auto"``: calls below the device's measured break-even run dense); ``0`` runs every call sparse.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = True, min_tokens: int | str | None = None):
        self.min_tokens = min_tokens
        from ..integration.apply import apply, get_runtime, remove, transformers_of

        self._apply, self._remove, self._runtime, self._transformers = apply, remove, get_runtime, transformers_of
        self.model = model
        self.device = device
        self.dtype = dtype
        #: ``on_step(job, index, seconds)`` after each denoising step (1-based; step 1's time includes the text
        #: encoder), or None
        self.on_step = None
        from .model_rules import is_embedded_folder

        if model == DEFAULT_MODEL or is_embedded_folder(model):  # its own folder given as --model: same defaults
            from ..tiny.model import DEFAULT_CALL, DEFAULT_NEGATIVE_PROMPT, build_pipeline

            self.pipe = build_pipeline(torch_dtype=dtype)  # --dtype is honoured on the embedded model too
            c = DEFAULT_CALL
            self.defaults = {"steps": c["num_inference_steps"], "frames": c["num_frames"], "height": c["height"],
                             "width": c["width"], "guidance_scale": c["guidance_scale"],
                             "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
                             "pipeline_kwargs": {"max_sequence_length": c["max_sequence_length"]}}
        else:
            from ..integration.pipelines import load_pipeline
            from .model_rules import read_render_defaults

            self.pipe = load_pipeline(model, torch_dtype=dtype)
            own = read_render_defaults(model) if Path(model).expanduser().is_dir() else {}
            self.defaults = {**call_defaults(type(self.pipe)), **own}  # a saved or copied folder renders as it did
        self.pipe = self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=not progress, leave=False)
        self.is_video = _is_video(type(self.pipe).__name__,
                                  type(self.pipe.vae).__name__ if hasattr(self.pipe, "vae") else None)
        self.rules = rules_of_pipeline(self.pipe, {k: v for k, v in self.defaults.items()
                                                  if k in ("steps", "frames", "height", "width", "guidance_scale")})
        for _, tr in self._transformers(self.pipe):  # every denoising step is a safe point for a held Ctrl-C
            tr.register_forward_pre_hook(lambda module, args: interrupts.check())
        interrupts.check()  # a Ctrl-C that a finaliser swallowed while the model loaded

    @property
    def suffix(self) -> str:
        return ".mp4" if self.is_video else ".png"

    def _call_kwargs(self, job: Job) -> dict:
        d = self.defaults
        kw = {"prompt": job.prompt, "num_inference_steps": job.steps if job.steps is not None else d.get("steps", 20),
              "generator": torch.Generator("cpu").manual_seed(job.seed), "output_type": "np"}
        for key, attr in (("height", "height"), ("width", "width"), ("guidance_scale", "guidance_scale")):
            val = getattr(job, attr) if getattr(job, attr) is not None else d.get(attr)
            if val is not None:
                kw[key] = val
        if self.is_video:
            frames = job.frames if job.frames is not None else d.get("frames")
            if frames is not None:
                kw["num_frames"] = frames
        neg = job.negative_prompt if job.negative_prompt is not None else d.get("negative_prompt")
        if neg is not None:
            kw["negative_prompt"] = neg
        kw.update(d.get("pipeline_kwargs", {}))
        kw.update(job.extra.get("pipeline_kwargs", {}))
        return kw

    def prompt_tokens(self, text: str, job: Job) -> tuple[int, int, int] | None:
        """``(tokens, kept, limit)``: how many tokens the pipeline's tokenizer makes of ``text`` (special tokens
        included), how many the text encoder is given, and the limit (the call's ``max_sequence_length``, else the
        tokenizer's own maximum). None when the pipeline has no tokenizer or no limit is known."""
        tok = getattr(self.pipe, "tokenizer", None)
        if tok is None or not callable(tok):
            return None
        limit = self._call_kwargs(job).get("max_sequence_length")
        if limit is None:
            p = inspect.signature(type(self.pipe).__call__).parameters.get("max_sequence_length")
            limit = p.default if p is not None and isinstance(p.default, int) else None
        if limit is None:
            limit = getattr(tok, "model_max_length", None)
        if not isinstance(limit, int) or limit > 1_000_000:
            return None
        n = len(tok(text, add_special_tokens=True)["input_ids"])
        return n, min(n, limit), limit

    def long_prompts(self, jobs: list[Job]) -> list[tuple[Job, str, int, int]]:
        """The jobs whose prompt or negative prompt the text encoder would cut: ``(job, which, tokens, kept)``."""
        out = []
        for job in jobs:
            neg = job.negative_prompt if job.negative_prompt is not None else self.defaults.get("negative_prompt")
            for which, text in (("prompt", job.prompt), ("negative_prompt", neg)):
                got = self.prompt_tokens(text, job) if text else None
                if got is not None and got[0] > got[1]:
                    out.append((job, which, got[0], got[1]))
        return out

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

    def _with_min_tokens(self, preset):
        """``preset`` (a name or a config) with :attr:`min_tokens` in its dense policy, when one is set."""
        if self.min_tokens is None:
            return preset
        from ..integration.pipelines.presets import with_min_tokens

        return with_min_tokens(preset, self.min_tokens)

    def _say_all_dense(self, preset) -> None:
        from .._logging import warn_once
        from ..backends.break_even import sparse_break_even

        name = preset if isinstance(preset, str) else "the config"
        dev = torch.device(self.device).type
        floor = sparse_break_even(dev)
        why = (f"below this {dev}'s measured break-even of {floor} tokens, DensePolicy(min_tokens='auto'): dense SDPA "
               "is faster there" if floor else "its dense policy (warm-up steps, dense layers, min_tokens)")
        warn_once(f"dit-sparse: {name} ran every attention call dense ({why}); pass --min-tokens 0 to run the "
                  "sparse path anyway", key=f"all-dense-{name}")

    def generate(self, job: Job, preset, *, record_masks: bool = False):
        """Run one job with ``preset`` (a preset name or a ``SparseAttentionConfig``; None = stock attention).

        Returns ``(frames, seconds, summary, call_kwargs)``; ``summary`` has the measured density and attention
        call counts (None for stock attention). The job is checked against the model's rules first
        (:meth:`dit_sparse.tools.model_rules.ModelRules.check`): nothing is rounded or replaced silently.
        """
        self.rules.check(job)
        if preset is not None:
            for rt in self._apply(self.pipe, self._with_min_tokens(preset)):
                rt.record_masks = record_masks
        try:
            kw = self._call_kwargs(job)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad(), self._timed_steps(job):
                out = self.pipe(**kw)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            summary = None
            if preset is not None:
                runtimes = [self._runtime(tr) for _, tr in self._transformers(self.pipe)]
                runs = [rt.last_run or rt.summary() for rt in runtimes if rt is not None]
                dens = [r["density"] for r in runs if r.get("density") is not None]
                summary = {"density": round(sum(dens) / len(dens), 4) if dens else None,
                           "attention_calls": {k: sum(r["calls"][k] for r in runs) for k in ("sparse", "dense")},
                           "layer_density": runs[0]["layer_density"] if runs else {}}
                if record_masks:
                    summary["masks"] = runtimes[0].last_masks
                if summary["attention_calls"]["sparse"] == 0 and summary["attention_calls"]["dense"] > 0:
                    self._say_all_dense(preset)
        finally:
            if preset is not None:
                self._remove(self.pipe)
        frames = out.frames[0] if hasattr(out, "frames") else np.asarray(out.images[0])[None]
        return np.asarray(frames), seconds, summary, kw

    @contextlib.contextmanager
    def _timed_steps(self, job: Job):
        """Calls :attr:`on_step` after every ``scheduler.step`` (once per denoising step in diffusers pipelines)."""
        sched, observer = getattr(self.pipe, "scheduler", None), self.on_step
        if observer is None or sched is None or "step" in vars(sched):
            yield
            return
        real, marks = sched.step, [time.perf_counter()]

        def step(*args, **kwargs):
            out = real(*args, **kwargs)
            marks.append(time.perf_counter())
            observer(job, len(marks) - 1, marks[-1] - marks[-2])
            return out

        sched.step = step
        try:
            yield
        finally:
            del sched.step

    def sidecar(self, job: Job, preset, kw: dict, seconds: float, summary, wall: float, frames=None) -> dict:
        """The JSON sidecar: what was rendered (frames, size and steps of the output, dtype, device, preset)."""
        from ..integration.pipelines.presets import PRESETS

        cfg = PRESETS[preset].config if isinstance(preset, str) and preset in PRESETS else preset
        shape = None if frames is None else np.asarray(frames).shape  # [F, H, W, 3]
        return {
            "name": job.name, "prompt": job.prompt, "negative_prompt": kw.get("negative_prompt"), "seed": job.seed,
            "steps": kw["num_inference_steps"],
            "frames": (int(shape[0]) if shape is not None else kw.get("num_frames")) if self.is_video else None,
            "height": int(shape[1]) if shape is not None else kw.get("height"),
            "width": int(shape[2]) if shape is not None else kw.get("width"),
            "guidance_scale": kw.get("guidance_scale"),
            "dtype": str(self.dtype).removeprefix("torch."),
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
    """Create ``out_dir`` (the temporary files of runs that are gone are removed by :class:`RunLog`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def job_preset(job: Job, default_preset: str | None):
    """The preset ``job`` renders with: its own, else ``default_preset``; None = stock attention."""
    preset = job.preset if job.preset is not None else default_preset
    return None if preset in (None, "none", "dense") else preset


def renderer_settings(renderer: Renderer, fps: int):
    """``settings_of(job, preset)``: the settings a job renders with on ``renderer`` (stored in its sidecar)."""
    return lambda job, preset: job_settings(job, preset, rules=renderer.rules, model=renderer.model,
                                            dtype=str(renderer.dtype), fps=fps, video=renderer.is_video,
                                            min_tokens=renderer.min_tokens)


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
               fps: int = 8, record=None) -> dict:
    """Render one job into ``out_dir`` (media, then sidecar, both atomic) and return its result entry.

    An older sidecar of the job is removed first, so until the new sidecar is in place the job counts as not done
    (the old media stays readable until the new one replaces it). The sidecar records the job's settings
    (:func:`~dit_sparse.tools.outputs.job_settings`), which a rerun compares. A job's own error does not propagate:
    it is returned as a ``"failed"`` entry with the error and traceback; but an error during a Ctrl-C is the
    interrupt (``KeyboardInterrupt``), not a failure. ``record(entry)`` (optional) is called with the entry in the
    same critical section that writes the sidecar, so a Ctrl-C never leaves a finished job unrecorded. Used by
    :func:`render_jobs` and by the Ray actors of :mod:`dit_sparse.tools.ray_batch`.
    """
    out_dir = Path(out_dir)
    preset = job_preset(job, default_preset)
    media, side = job_outputs(job, out_dir, renderer.suffix)
    entry = job_entry(job, default_preset, renderer.suffix)
    record = record if record is not None else (lambda e: None)
    t0 = time.perf_counter()
    try:
        frames, seconds, stats, kw = renderer.generate(job, preset)
        interrupts.check()
        side.unlink(missing_ok=True)
        save_media(frames, media, fps=fps)
        meta = renderer.sidecar(job, preset, kw, seconds, stats, time.perf_counter() - t0, frames)
        meta["settings"] = renderer_settings(renderer, fps)(job, preset)
        with interrupts.deferred():
            _write_json(side, meta)
            done = {**entry, "status": "done", "seconds": round(time.perf_counter() - t0, 3)}
            record(done)
        return done
    except Exception as e:  # one bad job must not stop the batch; the error is recorded
        if interrupts.requested():  # e.g. a library that turned the Ctrl-C into its own error
            raise KeyboardInterrupt from None
        failed = {**entry, "status": "failed", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=6)}
        record(failed)
        return failed


def render_jobs(renderer: Renderer, jobs: list[Job], out_dir: str | Path, *, default_preset: str | None,
                fps: int = 8, progress: bool = True, force: bool = False, run: RunLog | None = None) -> dict:
    """Render ``jobs`` into ``out_dir``; returns (and writes) the run summary.

    Finished jobs with the same settings are skipped; a finished job whose sidecar records other settings is a
    :class:`~dit_sparse.tools.jobs.JobError` (nothing rendered) unless ``force`` (then every job is rendered again
    and its files replaced atomically). A failing job is recorded with its error and the run goes on.
    ``default_preset`` applies to jobs without their own ``preset`` (None: stock attention). The summary is
    ``run``'s (:class:`~dit_sparse.tools.outputs.RunLog`; one is started when None): ``"state": "running"`` with
    the ``current`` job while it runs, then ``"finished"``. On ``KeyboardInterrupt`` (Ctrl-C) it is written with
    ``"state": "interrupted"``, ``"interrupted": true`` and the names of the jobs not finished under ``"pending"``,
    then the interrupt propagates. :func:`dit_sparse.tools.ray_batch.render_jobs_ray` does the same over a Ray
    cluster.
    """
    from tqdm.auto import tqdm

    out_dir = prepare_out_dir(out_dir)
    settings_of = renderer_settings(renderer, fps)
    skip = plan_outputs(jobs, out_dir, renderer.suffix, lambda j: settings_of(j, job_preset(j, default_preset)),
                        force=force)
    with run if run is not None else RunLog(out_dir, jobs) as log:
        results = []
        bar = tqdm(list(zip(jobs, skip)), desc="jobs", unit="job", disable=not progress)
        try:
            for job, skipped in bar:
                interrupts.check()
                bar.set_postfix_str(job.name[:40])
                if skipped:
                    results.append(skipped_entry(job, default_preset, renderer.suffix))
                    continue
                log.write(results, current=job.name)
                render_job(renderer, job, out_dir, default_preset=default_preset, fps=fps, record=results.append)
                log.write(results)
            interrupts.check()
        except KeyboardInterrupt:
            bar.close()
            log.write(results, state="interrupted")
            raise
        return log.write(results, state="finished")


def compare(renderer: Renderer, job: Job, preset: str, out_dir: str | Path, *, fps: int = 8) -> dict:
    """Render ``job`` dense and with ``preset`` (same seed); write a side-by-side file and a JSON report."""
    from .metrics import compare_frames

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dense, t_dense, _, kw = renderer.generate(job, None)
    sparse, t_sparse, stats, _ = renderer.generate(job, preset)
    metrics = compare_frames(sparse, dense)
    media = out_dir / f"{job.name}-compare{renderer.suffix}"
    save_media(side_by_side(dense, sparse), media, fps=fps)
    report = {"name": job.name, "prompt": job.prompt, "seed": job.seed, "preset": preset,
              "steps": kw["num_inference_steps"], "dense_s": round(t_dense, 3), "sparse_s": round(t_sparse, 3),
              "speedup": round(t_dense / t_sparse, 3),
              "measured_density": None if stats is None else stats["density"],
              **metrics, "lpips_note": None if metrics["lpips"] is not None else
              "LPIPS skipped: the lpips package or its weights are not available locally",
              "side_by_side": media.name, "layout": "left: dense, right: sparse", "model": renderer.model,
              "frames": int(dense.shape[0]) if renderer.is_video else None, "height": int(dense.shape[1]),
              "width": int(dense.shape[2]), "dtype": str(renderer.dtype).removeprefix("torch."),
              "device": renderer.device, "versions": library_versions()}
    _write_json(out_dir / f"{job.name}-compare.json", report)
    return report
