"""Render jobs and the model's rules, checked before any model loads (torch-free: the CLI validates with it first).

A :class:`Job` is one prompt to render. Every field is checked for type and range when the job is built
(:func:`Job.from_dict` for job files, the CLI for its flags); :func:`load_jobs` reads JSONL / YAML job files and
names the file and line (or list index) of any problem, with a did-you-mean for unknown keys. :class:`ModelRules`
holds what a model allows (frame count rule, size multiple, RoPE length, defaults), read from a diffusers folder's
JSON configs without loading weights, and checks a job against it; it also estimates a render's cost.

Errors are :class:`JobError` (a ``ValueError``) with one line: where, the field, what was got, what is expected,
and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Job", "JobError", "SetupError", "load_jobs", "ModelRules", "read_model_rules", "JOB_KEYS",
           "SEED_MAX", "parse_size", "suggest"]

#: seeds are 64-bit (``torch.Generator.manual_seed`` takes 0 .. 2**64 - 1)
SEED_MAX = 2**64 - 1


class JobError(ValueError):
    """A job field or a CLI value is wrong (the message names where, the field, got, expected and the fix)."""


class SetupError(ValueError):
    """The run cannot start: missing file, unwritable output, no CUDA, a model path that is not a diffusers
    folder. One line that names the fix."""


def suggest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` when ``word`` is close to one of ``options``, else ``''``."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(v) -> str:
    return type(v).__name__


def _bad(where: str, name: str, got, expected: str, fix: str) -> JobError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    loc = f"--{name.replace('_', '-')}" if where == "command line" else f"{where}: {name}"
    return JobError(f"{loc}: got {shown} ({_kind(got)}), expected {expected}; {fix}")


def _int(where, name, v, lo, hi=None, fix=""):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(where, name, v, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""),
                       fix or f"give a whole number, e.g. {max(lo, 1)}")
    if v < lo or (hi is not None and v > hi):
        rng = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise _bad(where, name, v, rng, fix or f"use a value in that range, e.g. {max(lo, 1)}")
    return v


def parse_size(v, where: str = "job", name: str = "size") -> tuple[int, int]:
    """``"WxH"`` or ``[W, H]`` -> ``(width, height)``."""
    w = h = None
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", v)
        if m:
            w, h = int(m.group(1)), int(m.group(2))
    elif isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in v):
        w, h = v
    if w is None or w < 1 or h < 1:
        raise _bad(where, name, v, '"WxH" with positive integers (or [W, H])', 'write it like "832x480"')
    return w, h


# field -> checker(where, name, value) -> normalised value
def _check_prompt(where, name, v):
    if not isinstance(v, str) or not v.strip():
        raise _bad(where, name, v, "a non-empty string", 'give the text to render, e.g. "a red circle moving right"')
    return v


def _check_opt_str(where, name, v):
    if v is not None and not isinstance(v, str):
        raise _bad(where, name, v, "a string", 'quote it, e.g. "blurry"')
    return v


def _check_seed(where, name, v):
    return _int(where, name, v, 0, SEED_MAX, fix=f"use a seed between 0 and 2**64 - 1 ({SEED_MAX})")


def _check_steps(where, name, v):
    return None if v is None else _int(where, name, v, 1, 10_000, fix="use at least 1 step, e.g. 20")


def _check_frames(where, name, v):
    return None if v is None else _int(where, name, v, 1, None, fix="use a positive frame count, e.g. 17")


def _check_side(where, name, v):
    return None if v is None else _int(where, name, v, 1, None, fix="use a positive number of pixels, e.g. 64")


def _check_guidance(where, name, v):
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _bad(where, name, v, "a finite number >= 0", "e.g. 4.0 (values <= 1 turn classifier-free "
                                                             "guidance off)")
    return float(v)


def _check_preset(where, name, v):
    if v is None:
        return v
    if not isinstance(v, str) or not v:
        raise _bad(where, name, v, "a preset name or 'none'", "see `dit-sparse presets`")
    if v in ("none", "dense"):
        return v
    from .pipelines.presets import PRESETS  # noqa: PLC0415 (no torch: presets import the config classes only)

    if v not in PRESETS:
        raise _bad(where, name, v, "a preset name or 'none'", f"see `dit-sparse presets`{suggest(v, PRESETS)}")
    return v


def _check_name(where, name, v):
    if v is None:
        return v
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", v):
        raise _bad(where, name, v, "a file name of letters, digits, '.', '_' and '-'", "e.g. fox-1")
    return v


def _check_kwargs(where, name, v):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad(where, name, v, "a mapping of pipeline keyword arguments", 'e.g. {"max_sequence_length": 32}')
    return v


_CHECKS = {"prompt": _check_prompt, "negative_prompt": _check_opt_str, "seed": _check_seed, "steps": _check_steps,
           "frames": _check_frames, "height": _check_side, "width": _check_side, "guidance_scale": _check_guidance,
           "preset": _check_preset, "name": _check_name}
_ALIASES = {"output": "name", "output_name": "name", "num_frames": "frames", "num_inference_steps": "steps"}
#: every key a job may have
JOB_KEYS = (*_CHECKS, "size", "pipeline_kwargs", *_ALIASES)


@dataclass
class Job:
    """One render. ``None`` fields take the model's defaults. Every field is checked at construction
    (:class:`JobError` names the field, what was got and what is expected)."""

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
    #: where the job came from (``jobs.jsonl:3``, ``jobs.yaml[2]``, ``command line``), for error messages
    where: str = field(default="job", compare=False, repr=False)

    def __post_init__(self):
        for f, check in _CHECKS.items():
            setattr(self, f, check(self.where, f, getattr(self, f)))
        if self.name is None:
            slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:60] or "job"
            self.name = f"{slug}-s{self.seed}" + (f"-{self.preset.replace(':', '_')}" if self.preset else "")
        if "pipeline_kwargs" in self.extra:
            _check_kwargs(self.where, "pipeline_kwargs", self.extra["pipeline_kwargs"])

    @classmethod
    def from_dict(cls, d, where: str = "job") -> Job:
        """A job from a mapping (a job file entry): unknown keys and wrong values raise :class:`JobError`."""
        if not isinstance(d, dict):
            raise JobError(f"{where}: got {_kind(d)} {str(d)[:40]!r}, expected an object with at least a "
                           f"'prompt', e.g. {{\"prompt\": \"a red circle moving right\", \"seed\": 1}}")
        kwargs, extra = {}, {}
        for k, v in d.items():
            key = _ALIASES.get(k, k)
            if key == "size":
                if v is None:
                    continue
                if "width" in d or "height" in d:
                    raise JobError(f"{where}: size: give 'size' or 'width'/'height', not both")
                kwargs["width"], kwargs["height"] = parse_size(v, where)
            elif key == "pipeline_kwargs":
                extra["pipeline_kwargs"] = _check_kwargs(where, k, v)
            elif key in _CHECKS:
                if key in kwargs:
                    raise JobError(f"{where}: {k}: {key!r} is given twice (under two names); keep one")
                kwargs[key] = v
            else:
                raise JobError(f"{where}: unknown key {k!r}{suggest(k, JOB_KEYS)}; a job has the keys "
                               f"{', '.join(JOB_KEYS[:11])}")
        if "prompt" not in kwargs:
            raise JobError(f"{where}: prompt: missing; every job needs one, e.g. \"prompt\": \"a red circle "
                           "moving right\"")
        return cls(**kwargs, extra=extra, where=where)

    def fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "where")}


def load_jobs(path: str | Path) -> list[Job]:
    """Jobs from a JSONL file (one object per line) or a YAML file (a list, or ``{jobs: [...]}``).

    Raises :class:`SetupError` for a missing or unreadable file and :class:`JobError` (naming ``file:line`` or
    ``file[index]``) for its content.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SetupError(f"job file {str(path)!r} does not exist; check the path (relative paths start in "
                         f"{Path.cwd()})") from None
    except IsADirectoryError:
        raise SetupError(f"job file {str(path)!r} is a folder; give a .jsonl or .yaml file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SetupError(f"cannot read job file {str(path)!r}: {e}; give a readable UTF-8 .jsonl or .yaml file"
                         ) from None
    items: list[tuple[str, object]] = []
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise JobError(f"{path}{at}: not valid YAML ({problem}); a YAML job file is a list of mappings, "
                           "e.g. '- prompt: a red circle moving right'") from None
        data = data.get("jobs", data) if isinstance(data, dict) else data
        if isinstance(data, list):
            items = [(f"{path}[{i}]", d) for i, d in enumerate(data)]
        elif data is not None:
            raise JobError(f"{path}: got a YAML {_kind(data)}, expected a list of jobs (or 'jobs: [...]')")
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    items.append((f"{path}:{i}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise JobError(f"{path}:{i}: not valid JSON ({e.msg}); a job file has one JSON object per "
                                   'line, e.g. {"prompt": "a red circle moving right"}') from None
    if not items:
        raise JobError(f"{path} holds no jobs; expected one JSON object per line (or a YAML list), each with at "
                       "least a 'prompt'")
    jobs = [Job.from_dict(d, where) for where, d in items]
    seen: dict[str, str] = {}
    for j in jobs:
        if j.name in seen:
            raise JobError(f"{j.where}: name: {j.name!r} is also the output name of {seen[j.name]}; give the jobs "
                           "distinct 'name' fields")
        seen[j.name] = j.where
    return jobs


# --------------------------------------------------------------------------------------------------------------
# What a model allows, read from its folder


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
        from .pipelines.presets import FAMILY_TRANSFORMERS

        family = next((f for f, c in FAMILY_TRANSFORMERS.items() if c == transformer), None)
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


def read_model_rules(model: str) -> ModelRules | None:
    """Rules of ``"embedded"`` or a local diffusers folder, from its JSON files; None for a hub id.

    Raises :class:`SetupError` when ``model`` looks like a path but does not exist, or is a folder without a
    ``model_index.json`` (not a diffusers pipeline).
    """
    if model == "embedded" or is_embedded_folder(model):
        from .tiny_model import ASSET_DIR as folder  # noqa: PLC0415
        from .tiny_model import DEFAULT_CALL

        c = DEFAULT_CALL
        defaults = {"steps": c["num_inference_steps"], "frames": c["num_frames"], "height": c["height"],
                    "width": c["width"], "guidance_scale": c["guidance_scale"]}
    else:
        folder = Path(model).expanduser()
        defaults = None
        if not folder.exists():
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
    index = _read_json(folder / "model_index.json")
    pipeline = str(index.get("_class_name", "DiffusionPipeline"))
    tr = index.get("transformer")
    transformer = tr[1] if isinstance(tr, list) and len(tr) == 2 else None
    t2 = index.get("transformer_2")
    experts = 2 if isinstance(t2, list) and len(t2) == 2 and t2[1] else 1
    return ModelRules.from_configs(pipeline, transformer, _read_json(folder / "transformer" / "config.json"),
                                   _read_json(folder / "vae" / "config.json"), experts, defaults)


def looks_like_hub_id(model: str) -> bool:
    """``owner/name`` with no path syntax (``./``, ``/``, ``~``, ``\\``)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model)) and not model.startswith((".", "~"))


def is_embedded_folder(model: str) -> bool:
    """``model`` is the embedded model's own folder (``dit_sparse/assets/tiny_wan``): it renders with the embedded
    model's defaults (17 x 64 x 64, 20 steps), not the generic pipeline's (81 x 480 x 832)."""
    from .tiny_model import ASSET_DIR

    try:
        return model != "embedded" and Path(model).expanduser().resolve() == ASSET_DIR.resolve()
    except OSError:
        return False
