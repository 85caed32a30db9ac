"""The sparse op on this CPU at real model shapes, against dense SDPA and flex in the same run.

For Wan2.1 480p (32,760 video tokens), Wan 720p and HunyuanVideo 720p (their token counts and head_dim 128, with
``--heads`` heads instead of the model's 12-40: a CPU call at 119k tokens takes minutes per head, and heads are
independent), fp32, the packed layout of 128-token blocks, and each density: a per-head random plan of that
density over the video blocks (text blocks dense, as :func:`benchmarks.attention.random_plan`), and the row
mode's pooled segment for it (``combine="row"``, two outlier keys per skipped block, as the presets run). Times
(median ms):

* ``dense_ms``: ``F.scaled_dot_product_attention`` on the model-order q/k/v (the best dense CPU kernel torch has);
* ``flex_ms``: ``torch.compile(flex_attention)`` on the same plan's ``BlockMask`` (the peer; no segment);
* ``ours_ms``: ``block_sparse_attention(..., backend="compiled")``; ``ours_segment_ms``: the same call with the
  pooled segment (what a row-mode preset runs); ``segment_cost``: its extra time over ``ours_ms``;
* ``speedup`` columns: dense over ours, dense over ours with the segment, flex over ours.

Each of ours is first checked against the fp32 torch reference on the rows of four query blocks
(:class:`benchmarks.attention.RowReference`); an error above ``1e-4`` marks the row ``WRONG`` and the run exits 1.
Compilation happens in an untimed first call. JSON is written after every row to
``benchmarks/results/attention-cpu.json`` (``--out DIR``).

    python benchmarks/attention_cpu.py                                   # all three shapes (about 15 min)
    python benchmarks/attention_cpu.py --shapes wan2.1-480p --densities 0.1 --rep 1
    python benchmarks/attention_cpu.py --shapes smoke --out /tmp/x      # checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, SHAPES, Shape, bench, environment, print_table, write_json  # noqa: E402
from benchmarks.attention import RowReference, random_plan, row_segment  # noqa: E402
from dit_sparse import TokenLayout, block_sparse_attention  # noqa: E402
from dit_sparse.backends import compiled  # noqa: E402

DENSITIES = (0.05, 0.1, 0.2, 0.5)
#: densities per shape by default (the 720p shapes at 0.1 only: a dense call there takes a minute per head)
DEFAULT = {"wan2.1-480p": DENSITIES, "wan2.1-720p": (0.1,), "hunyuan-720p": (0.1,)}
TOL = 1e-4
#: a seconds-long shape that checks the script (``--shapes smoke``), not a measurement
SMOKE = Shape("smoke", 2, 16, 24, 1, text=16, head_dim=32)


def flex_peer():
    """Compiled flex as the ``flex`` backend calls it: under the recompile limit our backend uses (past dynamo's
    default of 8 entries flex would run uncompiled, which materialises S x S: 57 GB at HunyuanVideo 720p)."""
    from dit_sparse.backends.flex import compiled_flex_attention

    return compiled_flex_attention


def run_shape(shape, heads: int, densities, rep: int, save) -> list[dict]:
    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, shape.tokens, heads, shape.head_dim, generator=g) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dense_ms = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=0, rep=rep)
    print(f"{shape.name}: {shape.tokens} tokens ({layout.padded_len} padded), {heads} head(s): dense SDPA "
          f"{dense_ms:.0f} ms", flush=True)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    flex = flex_peer()
    rows = []
    for density in densities:
        plan = random_plan(layout, heads, density, "cpu")
        seg = row_segment(qp, kp, vp, layout, plan)
        status, ms = "ok", {}
        for name, pooled in (("ours", None), ("ours_segment", seg)):
            out = block_sparse_attention(qp, kp, vp, plan, backend="compiled", pooled=pooled)  # compiles
            err = RowReference(qp, kp, vp, layout, plan, pooled).rel_err(out)
            ms[f"{name}_err"] = err
            if not err <= TOL:
                status = f"WRONG: {name} relative error {err:.2e} > {TOL:g}"
            ms[f"{name}_ms"] = bench(lambda a=(qp, kp, vp, plan), p=pooled: block_sparse_attention(
                *a, backend="compiled", pooled=p), warmup=0, rep=rep)
        bm = plan.to_flex(eager_safe=False)
        pt, kpt, vpt = (t.transpose(1, 2) for t in (qp, kp, vp))
        flex(pt, kpt, vpt, block_mask=bm)  # compiles
        flex_ms = bench(lambda a=(pt, kpt, vpt), m=bm: flex(*a, block_mask=m), warmup=0, rep=rep)
        row = dict(shape=shape.name, tokens=shape.tokens, padded_tokens=layout.padded_len,
                   padding=round(layout.padded_len / shape.tokens - 1, 4), heads=heads, head_dim=shape.head_dim,
                   block=layout.block_size, density=density, plan_density=round(plan.density, 4),
                   segment_keys=seg.num_keys, segment_keys_per_skipped_block=round(
                       seg.num_keys / max(1, layout.num_video_blocks * (1 - plan.density)), 3),
                   dense_ms=dense_ms, flex_ms=flex_ms, **ms, status=status,
                   speedup=dense_ms / ms["ours_ms"], speedup_segment=dense_ms / ms["ours_segment_ms"],
                   vs_flex=flex_ms / ms["ours_ms"], segment_cost=ms["ours_segment_ms"] / ms["ours_ms"] - 1)
        rows.append(row)
        save(row)
        print(f"  density {density}: ours {ms['ours_ms']:.0f} ms ({row['speedup']:.2f}x), with segment "
              f"{ms['ours_segment_ms']:.0f} ms ({row['speedup_segment']:.2f}x, segment +{row['segment_cost']:.1%}), "
              f"flex {flex_ms:.0f} ms; {status}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(DEFAULT), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--densities", default=None, help="comma list (default: all four at 480p, 0.1 at 720p)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--rep", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--append", action="store_true", help="keep the rows of other shapes already in the JSON "
                    "(a rerun of some shapes replaces their rows)")
    args = ap.parse_args(argv)
    env = environment()
    env["threads"] = torch.get_num_threads()
    done: list[dict] = []
    if args.append:
        old = (args.out or RESULTS) / "attention-cpu.json"
        if old.exists():
            rerun = set(args.shapes.split(","))
            done = [r for r in json.loads(old.read_text())["rows"] if r["shape"] not in rerun]

    def save(row):
        done.append(row)
        write_json("attention", {"environment": env, "dtype": "float32", "rows": done,
                                 "compile_s": compiled.compile_times()}, folder=args.out)

    with torch.no_grad():
        for name in args.shapes.split(","):
            dens = (tuple(float(d) for d in args.densities.split(",")) if args.densities else DEFAULT.get(
                name, DENSITIES))
            if name not in SHAPES and name != "smoke":
                ap.error(f"unknown shape {name!r}; expected a comma list of {', '.join(SHAPES)} or smoke")
            run_shape(SMOKE if name == "smoke" else SHAPES[name], args.heads, dens, args.rep, save)
    print_table(done, ["shape", "tokens", "density", "segment_keys", "dense_ms", "flex_ms", "ours_ms",
                       "ours_segment_ms", "speedup", "speedup_segment", "segment_cost", "status"])
    return 1 if any(r["status"] != "ok" for r in done) else 0


if __name__ == "__main__":
    raise SystemExit(main())
