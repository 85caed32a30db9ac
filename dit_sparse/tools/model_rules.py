"""What a model allows, read from a diffusers folder's JSON configs without loading weights (torch-free).

:class:`ModelRules` holds a model's frame count rule, size multiple, RoPE length, defaults and size class, checks a
:class:`~dit_sparse.tools.jobs.Job` against them (a :class:`~dit_sparse.tools.jobs.JobError` naming the rule and the
fix) and estimates a render's cost; :func:`read_model_rules` reads them for a ``--model`` argument.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..integration.adapters.registry import family_of
from .jobs import Job, JobError, SetupError, _bad

__all__ = ["ModelRules", "read_model_rules", "is_embedded_folder", "read_render_defaults", "DEFAULTS_FILE"]

#: a pipeline folder's own render defaults (``dit_sparse.tiny.model.save_pipeline`` writes it): a saved or copied
#: folder renders as it did, not with the pipeline class's defaults
DEFAULTS_FILE = "render_defaults.json"
_DEFAULT_KEYS = {"steps": int, "frames": int, "height": int, "width": int, "guidance_scale": (int, float),
                 "negative_prompt": str, "pipeline_kwargs": dict}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class ModelRules:
    """What a model accepts, from its diffusers configs (no weights loaded).

    Checked precisely for the Wan family (frames ``4k + 1``, height/width multiples of 16 and of the VAE's
    spatial factor x patch, latent positions within the RoPE table). Other families get the generic checks only;
    their own pipelines check the rest.
    """

    pipeline: str
    transformer: str | None = None
    family: str | None = None
    is_video: bool = True
    temporal_factor: int | None = None  # frames must be temporal_factor * k + 1
    spatial_factor: int | None = None  # pixels per latent cell
    patch: tuple[int, int, int] | None = None  # (t, h, w) latent cells per token
    size_multiple: int | None = None  # height and width multiples
    rope_max: int | None = None  # positions per axis the RoPE table holds
    hidden: int | None = None
    layers: int | None = None
    ffn: int | None = None
    experts: int = 1
    defaults: dict = field(default_factory=dict)  # steps, frames, height, width, guidance_scale

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_configs(cls, pipeline: str, transformer: str | None, tcfg: dict, vcfg: dict, experts: int = 1,
                     defaults: dict | None = None) -> ModelRules:
        found = family_of(transformer)
        family = found.name if found is not None else None
        vae = str(vcfg.get("_class_name", ""))
        is_video = "Video" in vae or "Wan" in pipeline or "Video" in pipeline
        heads, hd = tcfg.get("num_attention_heads"), tcfg.get("attention_head_dim")
        hidden = heads * hd if isinstance(heads, int) and isinstance(hd, int) else None
        kw = dict(pipeline=pipeline, transformer=transformer, family=family, is_video=is_video, hidden=hidden,
                  layers=tcfg.get("num_layers"), ffn=tcfg.get("ffn_dim"), experts=experts,
                  defaults=dict(defaults or {}))
        if family == "wan":
            p = tuple(tcfg.get("patch_size", (1, 2, 2)))
            sf = int(vcfg.get("scale_factor_spatial", 8))
            kw.update(temporal_factor=int(vcfg.get("scale_factor_temporal", 4)), spatial_factor=sf, patch=p,
                      size_multiple=math.lcm(16, sf * p[1], sf * p[2]), rope_max=int(tcfg.get("rope_max_seq_len",
                                                                                            1024)))
        return cls(**kw)

    @property
    def params(self) -> float | None:
        """Transformer parameters, estimated from its shape (one expert)."""
        if not (self.hidden and self.layers):
            return None
        return self.layers * (8 * self.hidden**2 + 2 * self.hidden * (self.ffn or 4 * self.hidden))

    @property
    def size_class(self) -> str:
        """``"toy"`` (< 50 M parameters: test and embedded models), ``"small"`` (< 3 B), ``"large"``, or
        ``"unknown"``."""
        p = self.params
        if p is None:
            return "unknown"
        return "toy" if p < 50e6 else "small" if p < 3e9 else "large"

    def describe(self) -> str:
        p = self.params
        size = f"~{p / 1e9:.1f} B" if p and p >= 1e8 else f"~{p / 1e6:.1f} M" if p else "unknown size"
        shape = f", {self.layers} layers x hidden {self.hidden}" if self.hidden else ""
        return f"{self.transformer or self.pipeline} ({size} parameters{shape}" + (
            f", {self.experts} experts)" if self.experts > 1 else ")")

    # -- checks ----------------------------------------------------------------------------------------------
    def resolve(self, job: Job) -> dict:
        """The values ``job`` renders with: its own, else the model's defaults (None where neither is known)."""
        d = self.defaults
        pick = lambda name: getattr(job, name) if getattr(job, name) is not None else d.get(name)
        out = {k: pick(k) for k in ("steps", "height", "width", "guidance_scale")}
        out["frames"] = pick("frames") if self.is_video else None
        return out

    def check(self, job: Job) -> None:
        """Raise :class:`JobError` when ``job`` does not fit the model; the message states the rule and the fix."""
        v, where = self.resolve(job), job.where
        flag = job.where == "command line"
        fname, sname = "frames", "size"
        if job.frames is not None and not self.is_video:
            raise JobError(f"{'--frames' if flag else where + ': frames'}: {self.pipeline} makes images, not "
                           "videos; drop it")
        tf, frames = self.temporal_factor, v["frames"]
        if self.rope_max and self.patch and self.spatial_factor and tf:
            grid = self.latent_grid(frames or 1, v["height"] or 0, v["width"] or 0)
            for axis, n in zip(("frames", "height", "width"), grid):
                if n > self.rope_max:
                    got = {"frames": frames, "height": v["height"], "width": v["width"]}[axis]
                    most = self.max_input(axis)
                    raise _bad(where, fname if axis == "frames" else sname if flag else axis, got,
                               f"at most {most} {'frames' if axis == 'frames' else 'pixels of ' + axis} (the "
                               f"model's rotary position table holds {self.rope_max} latent positions per axis)",
                               f"use {most} or fewer")
        if tf and frames is not None and frames % tf != 1 % tf:
            lo = max(1, (frames - 1) // tf * tf + 1)
            raise _bad(where, fname, frames, f"{tf}k + 1 frames for {self.family} models "
                       f"({self.transformer}: the VAE packs {tf} frames per latent frame after the first)",
                       f"use {lo} or {lo + tf}")
        m = self.size_multiple
        for side in ("width", "height"):
            if m and v[side] is not None and v[side] % m:
                lo = max(m, v[side] // m * m)
                raise _bad(where, sname if flag else side, v[side],
                           f"a {side} that is a multiple of {m} for this model", f"use {lo} or {lo + m}")

    def latent_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Tokens per axis ``(t, h, w)`` of a video of ``frames x height x width`` (Wan rules)."""
        tf, sf, (pt, ph, pw) = self.temporal_factor, self.spatial_factor, self.patch
        return (-(-((frames - 1) // tf + 1) // pt), height // sf // ph, width // sf // pw)

    def max_input(self, axis: str) -> int:
        tf, sf, (pt, ph, pw) = self.temporal_factor, self.spatial_factor, self.patch
        if axis == "frames":
            return (self.rope_max * pt - 1) * tf + 1
        return self.rope_max * sf * (ph if axis == "height" else pw)

    def tokens(self, job: Job) -> int | None:
        v = self.resolve(job)
        if not (self.patch and self.spatial_factor and self.temporal_factor) or None in (v["height"], v["width"]):
            return None
        return math.prod(self.latent_grid(v["frames"] or 1, v["height"], v["width"]))

    def flops(self, job: Job) -> float | None:
        """Transformer FLOPs of the whole render (all steps, both CFG branches; VAE and text encoder left out)."""
        n, v = self.tokens(job), self.resolve(job)
        if n is None or not (self.hidden and self.layers) or not v["steps"]:
            return None
        d, f = self.hidden, self.ffn or 4 * self.hidden
        per_token_layer = 6 * d * d + 2 * d * f + 2 * n * d  # multiply-adds: projections, FFN, attention
        branches = 2 if (v["guidance_scale"] or 0) > 1 else 1
        return 2.0 * per_token_layer * n * self.layers * v["steps"] * branches


def read_render_defaults(folder: str | Path) -> dict:
    """The render defaults a pipeline folder carries in ``render_defaults.json`` (``{}`` without one): ``steps``,
    ``frames``, ``height``, ``width``, ``guidance_scale``, ``negative_prompt``, ``pipeline_kwargs``. A file that is
    not such a mapping is a :class:`SetupError` naming it."""
    path = Path(folder).expanduser() / DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: not readable JSON ({e}); fix or remove the file (the folder's render "
                         "defaults)") from None
    if not isinstance(data, dict):
        raise SetupError(f"{path}: got a JSON {type(data).__name__}, expected an object like "
                         '{"height": 64, "width": 64, "frames": 17, "steps": 20}; fix or remove the file')
    for key, value in data.items():
        kind = _DEFAULT_KEYS.get(key)
        if kind is None:
            raise SetupError(f"{path}: unknown key {key!r}; the keys are {', '.join(_DEFAULT_KEYS)}; fix or remove "
                             "the file")
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 1):
            raise SetupError(f"{path}: {key}: got {value!r}, expected "
                             f"{'a positive integer' if kind is int else 'a ' + getattr(kind, '__name__', 'number')}"
                             "; fix or remove the file")
    return data


def read_model_rules(model: str) -> ModelRules | None:
    """Rules of ``"embedded"`` or a local diffusers folder, from its JSON files; None for a hub id.

    Raises :class:`SetupError` when ``model`` looks like a path but does not exist, or is a folder without a
    ``model_index.json`` (not a diffusers pipeline).
    """
    if model == "embedded" or is_embedded_folder(model):
        from ..tiny.model import ASSET_DIR as folder  # noqa: PLC0415
        from ..tiny.model import DEFAULT_CALL

        c = DEFAULT_CALL
        defaults = {"steps": c["num_inference_steps"], "frames": c["num_frames"], "height": c["height"],
                    "width": c["width"], "guidance_scale": c["guidance_scale"]}
    else:
        folder = Path(model).expanduser()
        defaults = None
        if not folder.exists():
            from ..integration.pipelines.loaders import looks_like_hub_id

            if looks_like_hub_id(model):
                return None
            raise SetupError(f"--model {model!r}: no such folder; give a diffusers pipeline folder (one with "
                             "model_index.json) or a hub id like Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
        if not folder.is_dir():
            raise SetupError(f"--model {model!r} is a file; give the diffusers pipeline folder (the one holding "
                             "model_index.json)")
        if not (folder / "model_index.json").is_file():
            inside = sorted(p.parent.name for p in folder.glob("*/model_index.json"))
            hint = f" (found one in {inside[0]!r}: use {str(folder / inside[0])!r})" if inside else ""
            raise SetupError(f"--model {model!r} is not a diffusers pipeline folder: it has no model_index.json"
                             f"{hint}; save a pipeline with save_pretrained() or download one with "
                             "huggingface-cli download")
        own = read_render_defaults(folder)
        defaults = {k: v for k, v in own.items() if k in ("steps", "frames", "height", "width", "guidance_scale")}
    index = _read_json(folder / "model_index.json")
    pipeline = str(index.get("_class_name", "DiffusionPipeline"))
    tr = index.get("transformer")
    transformer = tr[1] if isinstance(tr, list) and len(tr) == 2 else None
    t2 = index.get("transformer_2")
    experts = 2 if isinstance(t2, list) and len(t2) == 2 and t2[1] else 1
    return ModelRules.from_configs(pipeline, transformer, _read_json(folder / "transformer" / "config.json"),
                                   _read_json(folder / "vae" / "config.json"), experts, defaults)


def is_embedded_folder(model: str) -> bool:
    """``model`` is the embedded model's own folder (``dit_sparse/tiny/assets/tiny_wan``): it renders with the embedded
    model's defaults (17 x 64 x 64, 20 steps), not the generic pipeline's (81 x 480 x 832)."""
    from ..tiny.model import ASSET_DIR

    try:
        return model != "embedded" and Path(model).expanduser().resolve() == ASSET_DIR.resolve()
    except OSError:
        return False
