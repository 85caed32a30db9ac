"""Render jobs, checked before any model loads (torch-free: the CLI validates with it first).

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

__all__ = ["Job", "JobError", "SetupError", "load_jobs", "JOB_KEYS", "SEED_MAX", "parse_size", "suggest"]

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
    from ..integration.pipelines.presets import PRESETS  # noqa: PLC0415 (no torch: presets import the config classes only)

    if v not in PRESETS:
        raise _bad(where, name, v, "a preset name or 'none'", f"see `dit-sparse presets`{suggest(v, PRESETS)}")
    return v


def _check_name(where, name, v):
    if v is None:
        return v
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", v):
        raise _bad(where, name, v, "a file name of letters, digits, '.', '_' and '-'", "e.g. fox-1")
    return v


#: pipeline arguments that a job sets from its own fields: in ``pipeline_kwargs`` they would override those fields
#: behind the checks (a height the model cannot take, steps other than the sidecar says)
KWARG_FIELDS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
                "num_frames": "frames", "height": "height", "width": "width", "guidance_scale": "guidance_scale",
                "generator": "seed", "output_type": None, "return_dict": None}


def _check_kwargs(where, name, v):
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise _bad(where, name, v, "a mapping of pipeline keyword arguments", 'e.g. {"max_sequence_length": 32}')
    for key, value in v.items():
        if key not in KWARG_FIELDS:
            continue
        field_ = KWARG_FIELDS[key]
        loc = f"{where}: {name}"
        if field_ is None:
            raise JobError(f"{loc}: {key!r} is set by dit-sparse (it writes the frames itself); drop it")
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        fix = (f'give "seed": {shown} instead' if field_ == "seed" else
               f'give "size": "WxH" (or "{field_}": {shown}) instead' if field_ in ("height", "width") else
               f'give "{field_}": {shown} instead')
        raise JobError(f"{loc}: {key!r} is the job's {field_!r} field, which pipeline_kwargs must not override "
                       f"(it would bypass the checks and the sidecar); {fix}")
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
