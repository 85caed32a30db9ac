"""``dit-sparse``: batch render, dense-vs-sparse comparison, presets and the demo, from the command line."""

from __future__ import annotations

import argparse
import json
import sys

RENDER_EXAMPLES = """examples:
  dit-sparse render                                   # default prompt, embedded tiny model, CPU, ./outputs
  dit-sparse render --prompt "a red circle moving right" --seed 3 --steps 20
  dit-sparse render --jobs jobs.jsonl --out renders/  # one job per line: {"prompt": ..., "seed": ..., ...}
  dit-sparse render --model ./my-wan-folder --preset wan2.1-t2v-1.3b:draft-80 --device cuda --dtype bfloat16 \\
      --prompt "a fox in the snow" --frames 81 --size 832x480
  dit-sparse render --jobs jobs.jsonl --ray --ray-actors 2          # local Ray instance, 2 CPU actors
  dit-sparse render --jobs jobs.jsonl --ray auto --model ./wan --out /shared/renders   # 1 actor per GPU

job fields (JSONL or YAML): prompt, negative_prompt, seed, steps, frames, size ("WxH") or width/height,
guidance_scale, preset, name (output file name). Finished jobs (sidecar present) are skipped on rerun.

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
  dit-sparse demo                                     # http://127.0.0.1:7860
  dit-sparse demo --port 8000 --share-host 0.0.0.0
"""


def _dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be float32, float16 or bfloat16, got {name!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="diffusers pipeline folder or hub id (default: the "
                                                       "embedded tiny model, offline)")
    p.add_argument("--preset", default=None, help="preset name (see `dit-sparse presets`); 'none' = stock "
                                                  "attention; default: the model's default preset")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...; with --ray: cuda when the "
                                                   "cluster has GPUs, else cpu")
    p.add_argument("--dtype", type=_dtype, default="float32")
    p.add_argument("--out", default="outputs", help="output folder (default: ./outputs)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_job_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", default=None, help="WxH, e.g. 832x480")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--name", default=None, help="output file name (without extension)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-sparse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run `dit-sparse <command> --help` for examples")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    render = sub.add_parser("render", help="render prompts or a job file to mp4/png + JSON sidecars",
                            epilog=RENDER_EXAMPLES, formatter_class=fmt)
    _add_model_args(render)
    _add_job_args(render)
    render.add_argument("--jobs", default=None, help="job file (.jsonl, .yaml)")
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
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--share-host", default="127.0.0.1", help="address to listen on")
    return parser


def _job_from_args(args, default_prompt: str):
    from .render import Job

    w = h = None
    if args.size:
        try:
            w, h = (int(v) for v in args.size.lower().split("x"))
        except ValueError:
            raise SystemExit(f"dit-sparse: --size must look like 832x480, got {args.size!r}") from None
    return Job(prompt=args.prompt or default_prompt, negative_prompt=args.negative_prompt, seed=args.seed,
               steps=args.steps, frames=args.frames, width=w, height=h, guidance_scale=args.guidance_scale,
               name=args.name)


def _default_preset(renderer, requested: str | None) -> str | None:
    from .render import model_default_preset

    if requested is not None:
        return None if requested in ("none", "dense") else requested
    try:
        name = model_default_preset(renderer)
    except LookupError as e:
        raise SystemExit(f"dit-sparse: {e.args[0]}") from None
    if renderer.model != "embedded":
        from .integration import transformers_of

        cls = type(transformers_of(renderer.pipe)[0][1]).__name__
        print(f"dit-sparse: no --preset given, using {name!r} for {cls}", file=sys.stderr)
    return name


def _renderer(args):
    from .render import Renderer

    device = args.device or "cpu"
    print(f"dit-sparse: loading {'the embedded tiny model' if args.model == 'embedded' else args.model} on "
          f"{device} ...", file=sys.stderr)
    return Renderer(args.model, device=device, dtype=args.dtype, progress=not args.quiet)


def cmd_render(args) -> int:
    from .render import load_jobs, render_jobs

    if args.ray_actors is not None and args.ray is None:
        raise SystemExit("dit-sparse render: --ray-actors needs --ray")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise SystemExit("dit-sparse render: --ray-actors must be at least 1")
    if args.jobs and args.prompt:
        raise SystemExit("dit-sparse render: give --prompt or --jobs, not both")
    if args.ray is not None:
        from .distributed import render_jobs_ray

        jobs = load_jobs(args.jobs) if args.jobs else [_job_from_args(args, _default_prompt(args.model))]
        try:
            summary = render_jobs_ray(jobs, args.out, model=args.model, preset=args.preset, address=args.ray or None,
                                      actors=args.ray_actors, device=args.device, dtype=args.dtype, fps=args.fps,
                                      progress=not args.quiet)
        except (ImportError, LookupError, ConnectionError, RuntimeError) as e:
            raise SystemExit(f"dit-sparse render: {e}") from None
    else:
        renderer = _renderer(args)
        jobs = load_jobs(args.jobs) if args.jobs else [_job_from_args(args, _default_prompt(renderer.model))]
        preset = _default_preset(renderer, args.preset)
        summary = render_jobs(renderer, jobs, args.out, default_preset=preset, fps=args.fps,
                              progress=not args.quiet)
    for r in summary["results"]:
        line = f"  {r['status']:<28} {r['output']}"
        if r["status"] == "failed":
            line += f"  ({r['error']})"
        print(line)
    print(f"dit-sparse render: {summary['done']} done, {summary['skipped']} skipped, {summary['failed']} failed "
          f"-> {args.out}/ (run_summary.json)")
    return 1 if summary["failed"] else 0


def _default_prompt(model: str) -> str:
    if model == "embedded":
        from .tiny_model import DEFAULT_PROMPTS

        return DEFAULT_PROMPTS[0]
    raise SystemExit("dit-sparse: --prompt is required with --model")


def cmd_compare(args) -> int:
    from .render import compare

    renderer = _renderer(args)
    job = _job_from_args(args, _default_prompt(renderer.model))
    preset = _default_preset(renderer, args.preset)
    if preset is None:
        raise SystemExit("dit-sparse compare: needs a sparse preset to compare with dense")
    report = compare(renderer, job, preset, args.out, fps=args.fps)
    print(f"dense {report['dense_s']:.2f} s, sparse {report['sparse_s']:.2f} s ({report['speedup']:.2f}x), "
          f"density {report['measured_density']}, PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}"
          + (f", LPIPS {report['lpips']:.4f}" if report["lpips"] is not None else " (LPIPS unavailable offline)"))
    print(f"-> {args.out}/{report['side_by_side']} (left dense, right sparse)")
    return 0


def cmd_presets(args) -> int:
    from .pipelines.presets import list_presets

    presets = list_presets(args.family)
    if args.json:
        print(json.dumps([{"name": p.name, "family": p.family, "model_id": p.model_id,
                           "description": p.description} for p in presets], indent=2))
        return 0
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.description}")
    return 0


def cmd_demo(args) -> int:
    try:
        from app.ui import launch
    except ImportError as e:
        raise SystemExit(f"dit-sparse demo needs gradio and the repository's app/ folder: pip install "
                         f"'dit_sparse[app]' and run from the repository root ({e})") from None
    launch(host=args.share_host, port=args.port, block=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"render": cmd_render, "compare": cmd_compare, "presets": cmd_presets, "demo": cmd_demo}
    try:
        return handler[args.command](args)
    except ValueError as e:  # bad job files, presets, sizes: a readable message, not a stack trace
        print(f"dit-sparse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
