"""Per-layer breakdown of one sparse attention call: where the time goes outside the kernel.

One layer call of the composite engine (``SparseAttention``) at a model shape, split into its stages and timed
with CUDA events (median over repetitions, after warm-up):

* ``permute``   — q, k, v from model order to the block layout (``TokenLayout.permute``);
* ``select``    — the selectors' block mask (draft map + selection, neighbourhood, or IPAR/GAPR selection);
* ``plan``      — mask -> CSR plan (``plan_from_mask``);
* ``epilogue``  — rectification terms (R, c) attached to the plan (``combine="block"``); 0 without rectification;
* ``kernel``    — ``block_sparse_attention`` on the plan (for ``combine="row"``: the whole row-rectified call,
  kernel plus pooled remainder and merge, reported as ``kernel+merge``);
* ``unpermute`` — back to model order;
* ``engine``    — the same call through ``SparseAttention.__call__`` in one piece (what a layer really pays).

``outside_kernel_share = (engine - kernel) / kernel`` is the issue's "everything outside the kernel" figure
(target <= 10% at density 0.10). The shapes carry real and padded token counts (the layout's padding).

    python benchmarks/layer_breakdown.py                         # needs a CUDA GPU
    python benchmarks/layer_breakdown.py --out results_dir       # JSON into that folder
    python benchmarks/layer_breakdown.py --smoke                 # CPU dry run on a tiny shape (script check only)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dit_sparse  # noqa: E402
from benchmarks._common import SHAPES, Shape, environment, print_table, write_json  # noqa: E402
from dit_sparse import DensePolicy, block_sparse_attention  # noqa: E402
from dit_sparse.methods import SparseAttention  # noqa: E402
from dit_sparse.methods.base import plan_from_mask  # noqa: E402
from dit_sparse.methods.pooled_rectification import rectification_terms, row_rectified_attention  # noqa: E402

#: (shape, preset) pairs timed by default: HunyuanVideo 720p at about 0.10 density, Wan 480p at about 0.20
DEFAULT_CASES = ("hunyuan-720p:hunyuanvideo:draft-90", "hunyuan-720p:hunyuanvideo:rectified-90",
                 "wan2.1-480p:wan2.1-t2v-1.3b:draft-80")
STAGES = ("permute", "select", "plan", "epilogue", "kernel", "unpermute")


class _Timer:
    """Stage timer: CUDA events on GPU (no sync between stages), perf_counter with syncs on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def spans(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


def staged_call(engine: SparseAttention, q, k, v, layout, timer: _Timer) -> torch.Tensor:
    """The engine's sparse path, stage by stage (the same calls as ``SparseAttention.__call__`` without reuse)."""
    cfg = engine.config
    timer.mark("start")
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    timer.mark("permute")
    from dit_sparse.methods.pooled_rectification import CallStatistics

    rect = cfg.rectification
    stats = None if rect is None else CallStatistics(qp, kp, vp, layout, rect, None)  # as SparseAttention.__call__
    mask = engine.build_mask(qp, kp, layout, None, stats)
    timer.mark("select")
    if rect is not None and rect.per_row:
        timer.mark("plan")
        timer.mark("epilogue")
        out = row_rectified_attention(qp, kp, vp, layout, mask, rect, stats.scale, stats=stats()[0],
                                      backend=cfg.backend)
        timer.mark("kernel")
    else:
        plan = plan_from_mask(mask, layout)
        timer.mark("plan")
        if rect is not None and rect.rectify:
            st, p_tilde = stats()
            r, c = rectification_terms(qp, kp, vp, layout, plan.to_dense(), rect, stats.scale, stats=st,
                                       p_tilde=p_tilde)
            plan = plan.with_epilogue(out_scale=r, out_bias=c.transpose(1, 2))
        timer.mark("epilogue")
        out = block_sparse_attention(qp, kp, vp, plan, backend=cfg.backend)
        timer.mark("kernel")
    res = layout.unpermute(out)
    timer.mark("unpermute")
    return res


def run_case(shape: Shape, preset: str, device: torch.device, dtype, warmup: int, rep: int,
             packing: str) -> dict:
    config = dit_sparse.get_preset(preset).config
    config = dataclasses.replace(config, dense=DensePolicy(), reuse=None, packing=packing)  # time the sparse call
    layout = config.layout(shape.frames, shape.height, shape.width, shape.text, "after")
    engine = SparseAttention(config)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, shape.heads, shape.head_dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    engine_ms: list[float] = []
    with torch.no_grad():
        for i in range(warmup + rep):
            timer = _Timer(device)
            staged_call(engine, q, k, v, layout, timer)
            spans = timer.spans()
            t = _Timer(device)
            t.mark("start")
            engine(q, k, v, layout=layout, layer=0)
            t.mark("engine")
            if i >= warmup:
                for s in STAGES:
                    per_stage[s].append(spans[s])
                engine_ms.append(t.spans()["engine"])
    med = {s: statistics.median(v) for s, v in per_stage.items()}
    total = statistics.median(engine_ms)
    kernel = med["kernel"]
    density = engine.stats.get(0)
    row = {"shape": shape.name, "preset": preset, "packing": packing, "tokens": layout.seq_len,
           "padded_tokens": layout.padded_len, "padding": round(layout.padding_fraction, 5), "tile": layout.tile,
           "heads": shape.heads, "head_dim": shape.head_dim, "density": density,
           **{f"{s}_ms": med[s] for s in STAGES}, "sum_of_stages_ms": sum(med.values()), "engine_ms": total,
           "outside_kernel_ms": total - kernel, "outside_kernel_share": (total - kernel) / kernel if kernel else None}
    if config.rectification is not None and config.rectification.per_row:
        row["kernel_includes"] = "kernel+pooled remainder+merge (combine='row')"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES),
                    help="comma list of SHAPE:PRESET (shapes: " + ", ".join(SHAPES) + ")")
    ap.add_argument("--packing", default="packed", choices=["packed", "tiled", "both"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--rep", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on a tiny shape (no numbers worth reporting)")
    args = ap.parse_args(argv)
    packings = ["packed", "tiled"] if args.packing == "both" else [args.packing]
    if args.smoke:
        cases = [(Shape("smoke", 3, 10, 13, 2, text=20, head_dim=32), "wan2.1-t2v-1.3b:draft-80"),
                 (Shape("smoke", 3, 10, 13, 2, text=20, head_dim=32), "hunyuanvideo:rectified-90")]
        device, dtype, warmup, rep = torch.device("cpu"), torch.float32, 0, 1
    else:
        if not torch.cuda.is_available():
            print("benchmarks/layer_breakdown.py needs a CUDA GPU (CUDA-event stage times); pass --smoke for a CPU "
                  "dry run of the script.", file=sys.stderr)
            return 2
        cases = []
        for item in args.cases.split(","):
            shape, _, preset = item.partition(":")
            cases.append((SHAPES[shape], preset))
        device, dtype, warmup, rep = torch.device("cuda"), getattr(torch, args.dtype), 3, args.rep
    rows = [run_case(shape, preset, device, dtype, warmup, rep, packing)
            for shape, preset in cases for packing in packings]
    print()
    print_table(rows, ["shape", "preset", "packing", "padding", "density", *[f"{s}_ms" for s in STAGES],
                       "engine_ms", "outside_kernel_share"])
    if not args.smoke or args.out is not None:  # smoke runs write only where asked (the suite's dry run)
        path = write_json("layer_breakdown", {"environment": environment(), "rows": rows}, folder=args.out)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
