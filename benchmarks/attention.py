"""Block-sparse attention op benchmark at real model shapes (ALGORITHMS.md §1; issue "Core engine" item 7).

For Wan2.1 480p / 720p and HunyuanVideo 720p (head_dim 128, bf16) and densities 1.0 / 0.5 / 0.25 / 0.1 / 0.05,
times (median ms): dense SDPA per backend (cuDNN, flash, efficient), xformers when installed, flex_attention
(compiled) with the same plan, and ours (Triton). Ours runs on the tile-permuted, block-padded sequence (the
padding slots are counted in its time); the permute + unpermute cost is timed separately. Prints a table and
writes JSON to benchmarks/results/attention-<gpu>.json.

    python benchmarks/attention.py                     # needs a CUDA GPU
    python benchmarks/attention.py --smoke             # CPU dry run on tiny shapes (checks the script only)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import SHAPES, Shape, bench, environment, print_table, write_json  # noqa: E402
from dit_sparse import SparsePlan, TokenLayout, block_sparse_attention  # noqa: E402

DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)


def random_plan(layout: TokenLayout, heads: int, density: float, device, seed: int = 0) -> SparsePlan:
    """Every video query block reads round(density * Nv) video blocks (its own included) plus all text blocks;
    text query blocks are dense. Per-head random selection (a realistic, uniform per-row workload)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, nv = layout.num_blocks, layout.num_video_blocks
    keep = max(1, round(density * nv))
    score = torch.rand(1, heads, nv, nv, generator=g)
    score[..., torch.arange(nv), torch.arange(nv)] = 2.0  # diagonal always in
    top = score.topk(keep, dim=-1).indices
    mask = torch.zeros(1, heads, n, n, dtype=torch.bool)
    mask[..., :nv, :nv].scatter_(-1, top, True)
    mask[..., nv:] = True
    mask[..., nv:, :] = True
    mask = mask.to(device)
    return SparsePlan.from_dense(mask, block_q=layout.block_size, block_k=layout.block_size,
                                 seq_q=layout.padded_len, seq_k=layout.padded_len,
                                 kv_block_valid=layout.block_valid(device))


def sdpa_times(q, k, v) -> dict[str, float | None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = {}
    for name, kind in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                       ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([kind]):
                F.scaled_dot_product_attention(qt, kt, vt)
                out[name] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        except RuntimeError as e:
            print(f"  sdpa {name}: unavailable ({str(e).splitlines()[0][:80]})")
            out[name] = None
    return out


def xformers_time(q, k, v) -> float | None:
    try:
        import xformers.ops as xops
    except ImportError:
        return None
    return bench(lambda: xops.memory_efficient_attention(q, k, v))


def flex_fn():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def run_shape(shape: Shape, densities, dtype, device, smoke: bool) -> list[dict]:
    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, shape.heads, shape.head_dim, generator=g, device=device, dtype=dtype)
               for _ in range(3))
    print(f"\n{shape.name}: {layout!r}, heads={shape.heads}, D={shape.head_dim}, {dtype}")
    dense = sdpa_times(q, k, v) if device.type == "cuda" else {"math": bench(
        lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))), rep=3)}
    best_dense = min((t for t in dense.values() if t is not None), default=None)
    xf = xformers_time(q, k, v) if device.type == "cuda" else None
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    permute_ms = bench(lambda: [layout.permute(t) for t in (q, k, v)] + [layout.unpermute(qp)], rep=3)
    ours_backend = "triton" if device.type == "cuda" else "torch"
    flex = flex_fn()
    rows = []
    for density in densities:
        plan = random_plan(layout, shape.heads, density, device)
        ours = bench(lambda plan=plan: block_sparse_attention(qp, kp, vp, plan, backend=ours_backend),
                     rep=2 if smoke else 10)
        flex_ms = err = None
        try:
            bm = plan.to_flex(eager_safe=device.type != "cuda")
            qt, kt, vt = (t.transpose(1, 2) for t in (qp, kp, vp))
            ref = flex(qt, kt, vt, block_mask=bm).transpose(1, 2)
            flex_ms = bench(lambda qt=qt, kt=kt, vt=vt, bm=bm: flex(qt, kt, vt, block_mask=bm), rep=2 if smoke else 10)
            mine = block_sparse_attention(qp, kp, vp, plan, backend=ours_backend)
            valid_rows = layout.indices(device).perm >= 0
            diff = (mine - ref).float()[:, valid_rows]
            err = float(diff.norm() / ref.float()[:, valid_rows].norm())
        except Exception as e:  # flex failing is a data point, not a crash
            print(f"  flex at density {density}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        row = {"shape": shape.name, "tokens": layout.seq_len, "padded_tokens": layout.padded_len,
               "heads": shape.heads, "head_dim": shape.head_dim, "dtype": str(dtype).replace("torch.", ""),
               "density_requested": density, "density": round(plan.density, 4), **{f"sdpa_{n}_ms": t for n, t in
                                                                                   dense.items()},
               "xformers_ms": xf, "flex_ms": flex_ms, "ours_ms": ours, "permute_ms": permute_ms,
               "speedup_vs_dense": None if best_dense is None else best_dense / ours,
               "speedup_vs_flex": None if flex_ms is None else flex_ms / ours, "rel_err_vs_flex": err}
        rows.append(row)
        print(f"  density {density:<5} ours {ours:9.3f} ms  flex {flex_ms if flex_ms is None else round(flex_ms, 3)}"
              f"  best dense {best_dense:.3f} ms  err {err}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on tiny shapes (no numbers worth reporting)")
    args = ap.parse_args(argv)
    densities = [float(d) for d in args.densities.split(",")]
    if args.smoke:
        shapes = [Shape("smoke", 2, 8, 16, 2, text=20, head_dim=32)]
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("benchmarks/attention.py needs a CUDA GPU (times on CPU say nothing about the kernel). "
                  "Run it on a GPU machine, or pass --smoke for a CPU dry run of the script.", file=sys.stderr)
            return 2
        shapes = [SHAPES[s] for s in args.shapes.split(",")]
        device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    rows = []
    with torch.no_grad():
        for shape in shapes:
            rows += run_shape(shape, densities, dtype, device, args.smoke)
    cols = ["shape", "density", *[c for c in rows[0] if c.startswith("sdpa_")], "xformers_ms", "flex_ms",
            "ours_ms", "speedup_vs_dense", "speedup_vs_flex", "rel_err_vs_flex"]
    print()
    print_table(rows, cols)
    if not args.smoke:
        path = write_json("attention", {"environment": environment(), "rows": rows})
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
