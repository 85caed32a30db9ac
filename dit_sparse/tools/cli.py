"""``dit-sparse``: batch render, dense-vs-sparse comparison, presets and the demo, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# no torch / diffusers import at module level: `dit-sparse --help` must answer at once

DTYPES = ("float32", "float16", "bfloat16")

RENDER_EXAMPLES = """examples:
  dit-sparse render                                   # default prompt, embedded tiny model, CPU, ./outputs
  dit-sparse render --prompt "a red circle moving right" --seed 3 --steps 20
  dit-sparse render --jobs jobs.jsonl --out renders/  # one job per line: {"prompt": ..., "seed": ..., ...}
  dit-sparse render --model ./my-wan-folder --preset wan2.1-t2v-1.3b:draft-80 --device cuda --dtype bfloat16 \\
      --prompt "a fox in the snow" --frames 81 --size 832x480
  dit-sparse render --jobs jobs.jsonl --ray --ray-actors 2          # local Ray instance, 2 CPU actors
  dit-sparse render --jobs jobs.jsonl --ray auto --model ./wan --out /shared/renders   # 1 actor per GPU

job fields (JSONL or YAML): prompt, negative_prompt, seed, steps, frames, size ("WxH") or width/height,
guidance_scale, preset, name (output file name), pipeline_kwargs. Every field is checked before the model
loads; unknown keys are errors. Finished jobs (sidecar present) with the same settings are skipped on rerun
(without loading the model when all are); other settings under the same name are refused, naming what differs:
--force renders again. Ctrl-C stops cleanly and run_summary.json lists the pending jobs; each run also writes its
own runs/<run>.json (state running / finished / interrupted). With --model and no --preset, the preset is chosen
from the model's family and size (printed with the reason).

exit codes: 0 all jobs done or skipped, 1 a job failed, 2 bad input or set-up (one line that names the fix),
130 interrupted.

--ray needs `pip install 'dit_sparse[ray]'`. Each actor renders and writes its jobs itself: on a multi-node
cluster --out must be shared storage mounted at the same path on every node, and every node needs dit_sparse
and the model. A job whose actor died is retried on another actor (at most 3 times); a job that raised is
recorded as failed, not retried.
"""

COMPARE_EXAMPLES = """examples:
  dit-sparse compare                                  # default prompt on the embedded model, default preset
  dit-sparse compare --prompt "a blue square bouncing" --preset tiny-wan:draft-75 --seed 1
"""

PRESETS_EXAMPLES = """examples:
  dit-sparse presets
  dit-sparse presets --family hunyuanvideo
"""

DEMO_EXAMPLES = """examples:
  dit-sparse demo                                     # http://127.0.0.1:7860 (also: python -m dit_sparse.tools.app)
  dit-sparse demo --port 8000 --share-host 0.0.0.0
"""



def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="diffusers pipeline folder or hub id (default: the "
                                                       "embedded tiny model, offline)")
    p.add_argument("--preset", default=None, help="preset name (see `dit-sparse presets`); 'none' = stock "
                                                  "attention; default: chosen from the model's family and size")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...; with --ray: cuda when the "
                                                   "cluster has GPUs, else cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and compute precision "
                                                                      "(default float32)")
    p.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the mp4 (> 0, default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress or loading bars")
    p.add_argument("--min-tokens", type=_min_tokens, default=None, metavar="N|auto",
                   help="attention calls over fewer video tokens run dense (default: the preset's own, 'auto': "
                        "this device's measured break-even, below which dense SDPA is faster); 0 = always sparse")


def _min_tokens(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 or 'auto', got {text!r} (e.g. --min-tokens 0)")
    return value


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None, help="text to render (default on the embedded model: "
                                                  "'a red circle moving right'; required with --model)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="0 .. 2**64 - 1 (default 0)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames; Wan models: 4k + 1 (default: the model's)")
    p.add_argument("--size", default=None, help="WxH, e.g. 832x480; a multiple of the model's spatial factor "
                                                "(Wan: 16)")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--name", default=None, help="output file name (without extension)")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): ``dit-sparse render: error: ...; see --help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dit-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run `dit-sparse <command> --help` for examples")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    render = sub.add_parser("render", help="render prompts or a job file to mp4/png + JSON sidecars",
                            epilog=RENDER_EXAMPLES, formatter_class=fmt)
    _add_model_args(render)
    _add_job_args(render)
    render.add_argument("--jobs", default=None, help="job file (.jsonl, .yaml)")
    render.add_argument("--force", action="store_true", help="render every job again, also finished ones, and "
                                                             "replace their files atomically")
    render.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                        help="distribute the jobs over a Ray cluster: no ADDRESS starts (or attaches to) a local "
                             "Ray instance; 'auto' or 'ray://host:10001' connects to a cluster")
    render.add_argument("--ray-actors", type=int, default=None, metavar="N",
                        help="with --ray: number of actors, each holding one pipeline (default: one per GPU, "
                             "or one per CPU on CPU-only clusters; num_gpus=1 / num_cpus=1 each)")
    compare = sub.add_parser("compare", help="same prompt and seed, dense vs sparse: speedup, PSNR/SSIM, "
                                             "side-by-side video", epilog=COMPARE_EXAMPLES, formatter_class=fmt)
    _add_model_args(compare)
    _add_job_args(compare)
    presets = sub.add_parser("presets", help="list presets", epilog=PRESETS_EXAMPLES, formatter_class=fmt)
    presets.add_argument("--family", default=None)
    presets.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="launch the Gradio demo", epilog=DEMO_EXAMPLES, formatter_class=fmt)
    demo.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    demo.add_argument("--share-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                                "machine only; 0.0.0.0: every interface)")
    return parser


def _say(msg: str) -> None:
    print(f"dit-sparse: {msg}", file=sys.stderr)


# -- checks before any model loads ----------------------------------------------------------------------------
def _job_from_args(args, rules):
    """The command line's job (flags checked like job-file fields; errors name the flag)."""
    from .jobs import Job, JobError, parse_size

    prompt = args.prompt
    if prompt is None:
        if args.model != "embedded":
            raise JobError("--prompt: missing; with --model give the text to render, e.g. --prompt "
                           "\"a fox in the snow\" (or a job file with --jobs)")
        from ..tiny.model import DEFAULT_PROMPTS

        prompt = DEFAULT_PROMPTS[0]
    w = h = None
    if args.size is not None:
        w, h = parse_size(args.size, "command line", "size")
    return Job(prompt=prompt, negative_prompt=args.negative_prompt, seed=args.seed, steps=args.steps,
               frames=args.frames, width=w, height=h, guidance_scale=args.guidance_scale, name=args.name,
               where="command line")


def _check_common(args) -> None:
    from .jobs import JobError

    if args.fps < 1:
        raise JobError(f"--fps: got {args.fps}, expected an integer >= 1; e.g. --fps 8")


def _check_out(out: str) -> None:
    """``--out`` can be created and written (before any model loads)."""
    from .jobs import SetupError

    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        import os
        import secrets

        probe = path / f".dit_sparse-write-test-{os.getpid()}-{secrets.token_hex(4)}"  # concurrent runs: one each
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise SetupError(f"--out {out!r}: a file is in the way (it or a parent folder is a file); choose a "
                         "folder path") from None
    except NotADirectoryError:
        raise SetupError(f"--out {out!r}: a parent of it is a file, not a folder; choose a folder path") from None
    except OSError as e:
        raise SetupError(f"--out {out!r} cannot be written ({e.strerror or e}); choose a writable folder") from None


def _check_device(args) -> None:
    from .jobs import SetupError

    if args.device is None:
        return
    import torch

    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise SetupError(f"--device {args.device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {args.device}: no CUDA device is available (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SetupError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s); use "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise SetupError(f"--device {args.device!r}: only cpu and cuda are supported; use --device cpu or cuda")


def _check_jobs_against(jobs, rules, preset_arg) -> None:
    """Every job fits the model (frames rule, size multiple, RoPE length) and its preset fits the family."""
    from ..integration.pipelines.presets import PRESETS
    from .jobs import JobError

    for job in jobs:
        rules.check(job)
        for where, name in ((job.where, job.preset), ("--preset", preset_arg)):
            if name in (None, "none", "dense") or rules.family is None:
                continue
            fam = PRESETS[name].family
            if fam != rules.family:
                loc = "--preset" if where == "--preset" else f"{where}: preset"
                raise JobError(f"{loc}: {name!r} is a {fam} preset but the model is {rules.describe()}; pick a "
                               f"{rules.family} preset (`dit-sparse presets --family {rules.family}`)")


def _choose_preset(args, rules, *, quiet_reason: bool = False) -> str | None:
    """``--preset`` if given ('none'/'dense' = stock attention), else the model's default with the reason."""
    from ..integration.pipelines.presets import TINY_DEFAULT_PRESET, default_preset_for
    from .jobs import JobError

    if args.preset is not None:
        from .jobs import _check_preset

        _check_preset("command line", "preset", args.preset)
        return None if args.preset in ("none", "dense") else args.preset
    if args.model == "embedded":
        return TINY_DEFAULT_PRESET
    try:
        name, why = default_preset_for(rules.family, rules.size_class, experts=rules.experts, params=rules.params,
                                       what=rules.describe())
    except LookupError as e:
        raise JobError(f"--preset: {e.args[0]}") from None
    if not quiet_reason:
        _say(f"no --preset given: using {name!r} because {why} (pass --preset to choose)")
    return name


def _throughput(device: str, dtype_name: str) -> float:
    """Measured matmul FLOP/s on ``device`` in ``dtype`` (a rough upper bound for a transformer step)."""
    import time

    import torch

    dtype = getattr(torch, dtype_name)
    n = 1024 if device.startswith("cpu") else 4096
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        for _ in range(2):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0, reps = time.perf_counter(), 3
        for _ in range(reps):
            a @ a
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return 2 * n**3 * reps / (time.perf_counter() - t0)
    except RuntimeError:
        return 0.0


def _fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _fmt_flop(f: float) -> str:
    return f"{f / 1e12:.0f} TFLOP" if f >= 1e12 else f"{f / 1e9:.1f} GFLOP"


LONG_RUN_ENV = "DIT_SPARSE_LONG_RUN_S"


def _long_run_limit() -> float:
    """Seconds above which a run is warned about (``DIT_SPARSE_LONG_RUN_S``, default 600: ten minutes)."""
    import math
    import os

    from .jobs import SetupError

    raw = os.environ.get(LONG_RUN_ENV)
    if raw is None:
        return 600.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise SetupError(f"{LONG_RUN_ENV}={raw!r}: expected a number of seconds >= 0 (the run length above which "
                         f"dit-sparse warns); e.g. {LONG_RUN_ENV}=600, or unset it")
    return value


class _LongRun:
    """The warning for a long run from the speed of its first steps (the estimate before loading is a lower bound:
    transformer matmuls at the device's peak, decoding left out, so a long run can pass under it). After step 2 of
    the first job rendered, the steps still to come (scaled by each job's estimated cost per step where known) at
    that step's time are projected; above the limit, one warning."""

    def __init__(self, limit: float, rules, jobs):
        self.limit, self.rules, self.jobs, self.done = limit, rules, list(jobs), False

    def _per_step(self, job):
        if self.rules is None:
            return None
        flops, steps = self.rules.flops(job), self.rules.resolve(job)["steps"]
        return flops / steps if flops and steps else None

    def on_step(self, job, index: int, seconds: float) -> None:
        if self.done or index != 2 or job not in self.jobs:
            return
        self.done = True
        at = self.jobs.index(job)
        here = self._per_step(job)
        steps = lambda j: (self.rules.resolve(j)["steps"] if self.rules is not None else None) or j.steps or 0
        left = 0.0
        for j in self.jobs[at:]:
            n = steps(j) - (2 if j is job else 0)
            cost = self._per_step(j)
            left += max(n, 0) * (cost / here if cost and here else 1.0)
        projected = left * seconds
        if projected > self.limit:
            _say(f"warning: this run will take about {_fmt_seconds(projected)} more: a denoising step takes "
                 f"{seconds:.2f} s here and {left:.0f} step(s) of {len(self.jobs) - at} job(s) remain (decoding not "
                 f"counted); Ctrl-C stops cleanly")


def _folder_defaults(model: str) -> dict:
    from pathlib import Path

    from .model_rules import read_render_defaults

    return read_render_defaults(model) if Path(model).expanduser().is_dir() else {}


def _warn_cost(args, rules, jobs) -> None:
    """A real model on CPU, or a large estimated cost, gets a warning with the estimate before it starts (above
    :func:`_long_run_limit`); ``args.cost_warned`` says whether it did."""
    from .model_rules import is_embedded_folder

    limit = _long_run_limit()
    args.cost_warned = False
    device = args.device or "cpu"
    flops = [rules.flops(j) for j in jobs]
    known = [f for f in flops if f is not None]
    total = sum(known) if known else None
    real_on_cpu = device == "cpu" and rules.size_class in ("small", "large")
    embedded = args.model == "embedded" or is_embedded_folder(args.model)
    own = {} if embedded else _folder_defaults(args.model)
    for job in jobs:
        if not embedded and not {"width", "height"} <= own.keys() and (job.frames is None or job.width is None) \
                and rules.defaults:
            v = rules.resolve(job)
            who = "" if job.where == "command line" else f"{job.where}: "
            _say(f"{who}no --size/--frames given: the pipeline's defaults {v['width']}x{v['height']}"
                 + (f", {v['frames']} frames" if v["frames"] else "") + f", {v['steps']} steps")
            break
    if total is None or (total < limit * 1e10 and not real_on_cpu):  # within the limit even at 10 GFLOP/s
        if real_on_cpu:
            _say(f"warning: {rules.describe()} on CPU will be very slow; use --device cuda")
            args.cost_warned = True
        return
    rate = _throughput(device, args.dtype)
    secs = total / rate if rate else float("inf")
    if real_on_cpu or secs > limit:
        args.cost_warned = True
        where = "on CPU " if device == "cpu" else ""
        _say(f"warning: {rules.describe()} {where}— estimated {_fmt_flop(total)} in the transformer for "
             f"{len(known)} job(s), about {_fmt_seconds(secs)} at the {rate / 1e9:.0f} GFLOP/s a {args.dtype} "
             f"matmul reaches on {device} here (a lower bound); Ctrl-C stops cleanly"
             + ("; use --device cuda" if device == "cpu" else ""))


def _quiet_loading() -> None:
    """No loading bars (diffusers' per-component bar, transformers' checkpoint bar)."""
    import diffusers.utils.logging as dl

    dl.disable_progress_bar()
    try:
        import transformers.utils.logging as tl

        tl.disable_progress_bar()
    except ImportError:
        pass


def _prepare(args, *, compare: bool = False):
    """Everything checked before any model loads: ``(rules, jobs, preset)``; ``rules`` is None for a hub id."""
    from .jobs import JobError, load_jobs

    _check_common(args)
    from .render import folder_rules

    rules = folder_rules(args.model)  # SetupError for a missing path / a folder that is not a pipeline
    if getattr(args, "jobs", None):
        jobs = load_jobs(args.jobs)
    else:
        jobs = [_job_from_args(args, rules)]
    if compare and jobs[0].preset:
        raise JobError("compare takes --preset, not a job preset")
    preset = _choose_preset(args, rules, quiet_reason=rules is None) if rules is not None else (
        _choose_preset(args, rules) if args.preset is not None else None)
    if rules is not None:
        _check_jobs_against(jobs, rules, args.preset if args.preset not in ("none", "dense") else None)
    _check_out(args.out)
    _check_device(args)
    if rules is not None:
        _warn_cost(args, rules, jobs)
    if args.quiet:
        _quiet_loading()
    return rules, jobs, preset


def _renderer(args):
    import torch

    from .render import Renderer

    device = args.device or "cpu"
    _say(f"loading {'the embedded tiny model' if args.model == 'embedded' else args.model} on {device} "
         f"({args.dtype}) ...")
    try:
        return Renderer(args.model, device=device, dtype=getattr(torch, args.dtype), progress=not args.quiet,
                        min_tokens=getattr(args, "min_tokens", None))
    except OSError as e:  # hub id not found / offline, unreadable weights
        from .jobs import SetupError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SetupError(f"--model {args.model!r} could not be loaded ({first}); give a local diffusers "
                         "folder, or check the hub id and the network") from None


def _warn_long_prompts(renderer, jobs) -> None:
    """One warning when the text encoder would cut prompts (it keeps a fixed number of tokens)."""
    cut = renderer.long_prompts(jobs)
    if not cut:
        return
    job, which, n, kept = cut[0]
    who = "--prompt" if job.where == "command line" and which == "prompt" else (
        "--negative-prompt" if job.where == "command line" else f"{job.where}: {which}")
    more = f"; {len(cut) - 1} other prompt(s) too" if len(cut) > 1 else ""
    _say(f"warning: {who} is {n} tokens long but the text encoder keeps only the first {kept} (the rest is "
         f"ignored){more}; shorten the prompt")


def _after_load(args, renderer, rules, jobs, preset):
    """Hub ids: the rules and the default preset are known only now. Prompts longer than the text encoder takes
    are named."""
    _warn_long_prompts(renderer, jobs)
    if rules is None:
        from .jobs import JobError
        from .render import model_default_preset

        rules = renderer.rules
        if args.preset is None:
            try:
                preset, why = model_default_preset(renderer, with_reason=True)
            except LookupError as e:
                raise JobError(f"--preset: {e.args[0]}") from None
            _say(f"no --preset given: using {preset!r} because {why} (pass --preset to choose)")
        _check_jobs_against(jobs, rules, preset)
        _warn_cost(args, rules, jobs)
    return preset


def _plan_outputs(args, rules, jobs, preset):
    """Before any model loads: every file name fits, and a rerun asks the settings its finished jobs were rendered
    with (else a one-line error, unless --force). The jobs to skip (True), or None where the model is not at hand
    yet (a hub id: checked once it has loaded)."""
    from .outputs import check_name_lengths, job_settings, plan_outputs
    from .render import job_preset, media_suffix

    check_name_lengths(jobs, args.out)
    suffix = media_suffix(args.model)
    if rules is None or suffix is None:
        return None
    return plan_outputs(jobs, args.out, suffix, lambda j: job_settings(
        j, job_preset(j, preset), rules=rules, model=args.model, dtype=args.dtype, fps=args.fps,
        video=suffix == ".mp4", min_tokens=getattr(args, "min_tokens", None)), force=args.force)


def _all_skipped(args, jobs, preset, run) -> dict:
    """Every job is rendered already with the same settings: the summary, and no model loaded."""
    from .render import media_suffix, skipped_entry

    suffix = media_suffix(args.model)
    _say(f"all {len(jobs)} job(s) are already rendered in {args.out}/ with the same settings: nothing to do, the "
         "model is not loaded (--force renders them again)")
    with run:
        return run.write([skipped_entry(j, preset, suffix) for j in jobs], state="finished")


def _run(args, rules, jobs, preset, skip, run) -> dict:
    """The render itself, inside ``run`` (the run summary): skip all, over Ray, or here."""
    if skip is not None and all(skip):
        return _all_skipped(args, jobs, preset, run)
    if args.ray is not None:
        import torch

        from .ray_batch import render_jobs_ray

        ray_preset = args.preset if args.preset is not None else preset
        try:
            return render_jobs_ray(jobs, args.out, model=args.model, preset=ray_preset, address=args.ray or None,
                                   actors=args.ray_actors, device=args.device, dtype=getattr(torch, args.dtype),
                                   fps=args.fps, progress=not args.quiet, force=args.force, rules=rules,
                                   run_log=run)
        except (ImportError, LookupError, ConnectionError, RuntimeError) as e:  # set-up: one line, exit 2
            from .jobs import SetupError

            raise SetupError(str(e).strip().replace("\n", " ")) from None
    from .render import render_jobs

    renderer = _renderer(args)
    preset = _after_load(args, renderer, rules, jobs, preset)
    if not getattr(args, "cost_warned", False):
        pending = [j for j, skipped in zip(jobs, skip or [False] * len(jobs)) if not skipped]
        renderer.on_step = _LongRun(_long_run_limit(), renderer.rules, pending).on_step
    return render_jobs(renderer, jobs, args.out, default_preset=preset, fps=args.fps, progress=not args.quiet,
                       force=args.force, run=run)


def cmd_render(args) -> int:
    from .jobs import JobError

    if getattr(args, "min_tokens", None) is not None and args.ray is not None:
        raise JobError("--min-tokens is not passed to Ray actors yet; render without --ray, or set "
                       "DensePolicy(min_tokens=...) in a config of your own")
    if args.ray_actors is not None and args.ray is None:
        raise JobError("--ray-actors needs --ray; add --ray (local Ray) or --ray auto (a cluster)")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise JobError(f"--ray-actors: got {args.ray_actors}, expected at least 1")
    if args.jobs and args.prompt is not None:
        raise JobError("give --prompt or --jobs, not both")
    rules, jobs, preset = _prepare(args)
    skip = _plan_outputs(args, rules, jobs, preset)
    import contextlib

    from . import interrupts
    from .outputs import RunLog

    with contextlib.ExitStack() as stack:
        with interrupts.deferred():  # a Ctrl-C from here on ends in this run's summary (state interrupted)
            run = stack.enter_context(RunLog(args.out, jobs, say=_say))
            args.run_log = run
        summary = _run(args, rules, jobs, preset, skip, run)
    for r in summary["results"]:
        line = f"  {r['status']:<28} {r['output']}"
        if r["status"] == "failed":
            line += f"  ({r['error']})"
        print(line)
    print(f"dit-sparse render: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed "
          f"-> {args.out}/ (runs/{run.run}.json)")
    return 1 if summary["failed"] else 0


def cmd_compare(args) -> int:
    from .jobs import JobError
    from .render import compare
    from .words import speed_words

    rules, jobs, preset = _prepare(args, compare=True)
    from .outputs import check_name_lengths

    check_name_lengths(jobs, args.out, extra_stem="-compare")
    if args.preset is not None and preset is None:
        raise JobError("--preset none: compare needs a sparse preset to compare with dense; pick one from "
                       "`dit-sparse presets`")
    renderer = _renderer(args)
    preset = _after_load(args, renderer, rules, jobs, preset)
    if preset is None:
        raise JobError("--preset: compare needs a sparse preset to compare with dense")
    report = compare(renderer, jobs[0], preset, args.out, fps=args.fps)
    density = report["measured_density"]
    print(f"dense {report['dense_s']:.2f} s, sparse {report['sparse_s']:.2f} s: sparse is "
          f"{speed_words(report['speedup'])} (on {renderer.device}), density "
          f"{'n/a' if density is None else f'{density:.2f}'}, PSNR {report['psnr']:.2f} dB, "
          f"SSIM {report['ssim']:.3f}"
          + (f", LPIPS {report['lpips']:.3f}" if report["lpips"] is not None else " (LPIPS unavailable offline)"))
    print(f"-> {args.out}/{report['side_by_side']} (left dense, right sparse)")
    return 0


def cmd_presets(args) -> int:
    from ..integration.pipelines.presets import list_presets

    presets = list_presets(args.family)
    if args.json:
        print(json.dumps([{"name": p.name, "family": p.family, "model_id": p.model_id,
                           "description": p.description} for p in presets], indent=2))
        return 0
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.description}")
    return 0


def _check_listen(host: str, port: int) -> str:
    """The demo can listen on ``host:port`` (a bind, before gradio loads): a one-line error naming the fix if not.
    Returns the URL to open."""
    import errno
    import socket

    from .jobs import SetupError

    if not 1 <= port <= 65535:
        raise SetupError(f"--port {port}: expected a port number 1 .. 65535; e.g. --port 7860")
    fix_host = "use --share-host 127.0.0.1 (this machine only) or 0.0.0.0 (every network interface)"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise SetupError(f"--share-host {host!r} is not a host name or address of this machine "
                         f"({getattr(e, 'strerror', None) or e}); {fix_host}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise SetupError(f"--port {port} is in use on {host} (another program, or a demo already running "
                                 f"there); pick a free port, e.g. --port {port + 1 if port < 65535 else 7860}"
                                 ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise SetupError(f"--share-host {host!r} is not an address of this machine; {fix_host}") from None
            if e.errno == errno.EACCES:
                raise SetupError(f"--port {port}: this user may not listen on it (ports below 1024 need root); use "
                                 "a port above 1023, e.g. --port 7860") from None
            raise SetupError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or "
                             f"--share-host") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def cmd_demo(args) -> int:
    import time

    from .jobs import SetupError

    url = _check_listen(args.share_host, args.port)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SetupError("dit-sparse demo needs gradio: pip install 'dit_sparse[app]'") from None
    from .app.ui import launch

    try:
        demo = launch(host=args.share_host, port=args.port, block=False)
    except OSError as e:  # the port was taken between the check and the start
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"the demo could not listen on {args.share_host}:{args.port} ({first}); pick another "
                         "--port") from None
    elsewhere = " (and from other machines at this machine's address)" if url.startswith("http://127.0.0.1") and \
        args.share_host in ("0.0.0.0", "::") else ""
    print(f"dit-sparse demo: running, open {url} in a browser{elsewhere}; Ctrl-C stops it", flush=True)
    try:
        while demo.is_running:
            time.sleep(0.2)
    finally:
        demo.close()
    return 0


def _interrupted(args) -> int:
    """The one line a Ctrl-C ends with (exit 130); the run's summary names the pending jobs."""
    run = getattr(args, "run_log", None)
    line = f"\ndit-sparse {args.command}: interrupted (Ctrl-C)"
    if run is not None:
        done = sum(r["status"] == "done" for r in run.results)
        pending = len(run.jobs) - len(run.results)
        line += (f"; {done} job(s) rendered in this run are kept, {pending} pending are listed in "
                 f"{run.out_dir}/{run.own.parent.name}/{run.own.name}: rerun the same command to resume")
    print(line, file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    from . import interrupts

    args = build_parser().parse_args(argv)
    handler = {"render": cmd_render, "compare": cmd_compare, "presets": cmd_presets, "demo": cmd_demo}
    with interrupts.handling():  # a Ctrl-C at any point ends here (exit 130), none is lost
        try:
            try:
                return handler[args.command](args)
            finally:
                interrupts.check()  # one that was recorded but not raised yet
        except KeyboardInterrupt:
            interrupts.finishing()
            return _interrupted(args)
        except ValueError as e:  # JobError, SetupError, bad presets: one line that names the fix, no stack trace
            msg = str(e).strip().splitlines()
            print(f"dit-sparse {args.command}: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    raise SystemExit(main())
