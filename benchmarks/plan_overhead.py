"""Plan-building overhead of each method against dense attention time at model shapes.

Times (median ms), per shape: the tile permutation of q/k/v, each method's plan (draft: pooling + draft map +
selection + CSR; rectification: pooling + IPAR + GAPR + selection + R/c; neighbourhood: cached plan lookup
and a cold build; reuse: the pooled-query drift check), and the best dense SDPA time for the same call.
Target on H100: plan building <= 3% of dense attention at HunyuanVideo 720p.

    python benchmarks/plan_overhead.py            # needs a CUDA GPU
    python benchmarks/plan_overhead.py --device cpu [--heads 2] [--shapes ...]   # CPU, stage by stage
    python benchmarks/plan_overhead.py --smoke    # CPU dry run on a tiny shape (CPU stage mode, nothing written)

``--device cpu`` (the CPU mode, :func:`run_shape_cpu`): at each real shape (all its tokens, ``--heads`` heads, fp32)
the draft plan stage by stage (block pooling of q and k, draft map, row selection, CSR) and the row-rectification
plan of the default ``PooledRectificationConfig(combine="row")`` (``row_outliers=2``) stage by stage (block means,
GAPR deviations, outlier keys, IPAR, selection, CSR, pooled segment), each a median over ``--rep`` calls, against
ONE dense SDPA call at the same shape measured in the same run. Dense SDPA at 119k tokens takes about a minute per
head on a small CPU, so it is timed on ``--dense-heads`` heads (default 1) and scaled linearly to the plan's head
count (SDPA's cost is linear in heads); the JSON says so (``dense_timed_heads``, ``dense_scaled``). Goal: plan
building <= 5% of one dense call. Writes ``plan_overhead-cpu.json``.
    python benchmarks/plan_overhead.py --selection [--shapes hunyuan-720p] [--device cpu]

``--selection``: rectification's block selection alone on float32 probability rows ``[1, H, Nv, Nv + 1]`` (random
softmax rows) at each shape's block grid: the full-row sort (``select_sorted_reference``, the implementation
before, with the same forced-block assembly) against ``select_critical_blocks`` (``torch.topk`` over
``selection_width`` candidates), both without neighbours or first-frame blocks, masks checked equal. Runs on
any device (CPU allowed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import SHAPES, Shape, bench, environment, print_table, write_json  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods import (  # noqa: E402
    DraftAttentionConfig,
    NeighborhoodConfig,
    PooledRectificationConfig,
    draft_plan,
    neighborhood_plan,
    rectified_plan,
)
from dit_sparse.methods.base import forced_mask, pool_blocks  # noqa: E402
from dit_sparse.methods.neighborhood import _cached_mask, _cached_plan  # noqa: E402
from dit_sparse.methods.pooled_rectification import select_critical_blocks, selection_width  # noqa: E402
from dit_sparse.methods.temporal_reuse import pooled_query_drift  # noqa: E402
from dit_sparse.reference.rectification import select_sorted_reference  # noqa: E402


def best_dense_ms(q, k, v) -> float:
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if not q.is_cuda:
        return bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), rep=3)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = []
    for kind in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([kind]):
                F.scaled_dot_product_attention(qt, kt, vt)
                times.append(bench(lambda: F.scaled_dot_product_attention(qt, kt, vt)))
        except RuntimeError:
            pass
    return min(times)


def run_shape(shape: Shape, device, dtype, rep: int) -> dict:
    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)
    q, k, v = (torch.randn(1, layout.seq_len, shape.heads, shape.head_dim, device=device, dtype=dtype)
               for _ in range(3))
    dense = best_dense_ms(q, k, v)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    q_ref = pool_blocks(qp, layout)
    nb = NeighborhoodConfig(window=(3, 3, 5))

    def cold_neighbourhood():
        _cached_mask.cache_clear()
        _cached_plan.cache_clear()
        return neighborhood_plan(layout, nb, device)

    timings = {
        "permute_qkv": bench(lambda: [layout.permute(t) for t in (q, k, v)], rep=rep),
        "draft_plan": bench(lambda: draft_plan(qp, kp, layout, DraftAttentionConfig(sparsity=0.9)), rep=rep),
        "rectified_plan": bench(lambda: rectified_plan(qp, kp, vp, layout, PooledRectificationConfig(sparsity=0.9)),
                                rep=rep),
        "neighbourhood_plan_cached": bench(lambda: neighborhood_plan(layout, nb, device), rep=rep),
        "neighbourhood_plan_cold": bench(cold_neighbourhood, rep=max(2, rep // 3)),
        "reuse_drift_check": bench(lambda: pooled_query_drift(pool_blocks(qp, layout), q_ref), rep=rep),
    }
    row = {"shape": shape.name, "tokens": layout.seq_len, "blocks": layout.num_blocks, "heads": shape.heads,
           "dense_ms": dense}
    for name, ms in timings.items():
        row[f"{name}_ms"] = ms
        row[f"{name}_pct"] = 100.0 * ms / dense
    print(f"{shape.name}: dense {dense:.2f} ms; " + ", ".join(f"{n} {ms:.3f} ms ({100 * ms / dense:.2f}%)"
                                                          for n, ms in timings.items()))
    return row


def _median_ms(fn, rep: int) -> float:
    return bench(fn, warmup=1, rep=rep)


def run_shape_cpu(shape: Shape, heads: int, rep: int, dense_heads: int = 1) -> dict:
    """The CPU mode: draft and row-rectification plan building stage by stage at ``heads`` heads (fp32) against
    one dense SDPA call at ``dense_heads`` heads scaled linearly to ``heads`` (see the module docstring)."""
    from dit_sparse.methods.base import plan_from_mask
    from dit_sparse.methods.draft_attention import draft_map, draft_select
    from dit_sparse.methods.rectification.row_combine import pooled_segment
    from dit_sparse.methods.rectification.statistics import (
        _block_outliers,
        _mean_abs_deviation,
        block_statistics,
        ipar_probabilities,
        row_outlier_count,
    )

    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, heads, shape.head_dim, generator=g) for _ in range(3))
    qd, kd, vd = (t[:, :, :dense_heads].transpose(1, 2).contiguous() for t in (q, k, v))
    F.scaled_dot_product_attention(qd[..., :256, :], kd, vd)  # first-call set-up outside the timing
    dense_reps = 1 if layout.seq_len > 40_000 else 2
    dense_timed = bench(lambda: F.scaled_dot_product_attention(qd, kd, vd), warmup=0, rep=dense_reps)
    dense = dense_timed * heads / dense_heads
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    scale = shape.head_dim ** -0.5
    dcfg = DraftAttentionConfig(sparsity=0.9)
    rcfg = PooledRectificationConfig(sparsity=0.9, combine="row")
    outliers = row_outlier_count(rcfg)
    draft = draft_map(qp, kp, layout)
    dmask = draft_select(draft, layout, dcfg)
    stats = block_statistics(qp, kp, vp, layout, deviations=rcfg.gapr, outliers=outliers)
    p_tilde = ipar_probabilities(stats, scale)
    rmask = select_critical_blocks(p_tilde, layout, rcfg)
    stages = {
        "draft_pool_qk": lambda: (pool_blocks(qp, layout), pool_blocks(kp, layout)),
        "draft_map": lambda: draft_map(qp, kp, layout),
        "draft_select": lambda: draft_select(draft, layout, dcfg),
        "draft_csr": lambda: plan_from_mask(dmask, layout),
        "draft_plan": lambda: draft_plan(qp, kp, layout, dcfg),
        "rect_means_qkv": lambda: [pool_blocks(t, layout) for t in (qp, kp, vp)],
        "rect_deviations": lambda: (_mean_abs_deviation(qp, stats.q_mean, layout),
                                    _mean_abs_deviation(kp, stats.k_mean, layout)),
        "rect_outliers": lambda: _block_outliers(kp, vp, stats.k_mean, layout, outliers),
        "rect_statistics": lambda: block_statistics(qp, kp, vp, layout, deviations=rcfg.gapr, outliers=outliers),
        "rect_ipar": lambda: ipar_probabilities(stats, scale),
        "rect_select": lambda: select_critical_blocks(p_tilde, layout, rcfg),
        "rect_csr": lambda: plan_from_mask(rmask, layout),
        "rect_segment": lambda: pooled_segment(layout, rmask, rcfg, stats=stats),
    }

    def rect_plan():  # everything the row mode builds before the kernel: statistics, IPAR, selection, CSR, segment
        st = block_statistics(qp, kp, vp, layout, deviations=rcfg.gapr, outliers=outliers)
        mask = select_critical_blocks(ipar_probabilities(st, scale), layout, rcfg)
        return plan_from_mask(mask, layout), pooled_segment(layout, mask, rcfg, stats=st)

    stages["rect_plan"] = rect_plan
    times = {name: _median_ms(fn, rep) for name, fn in stages.items()}
    row = {"shape": shape.name, "device": "cpu", "dtype": "float32", "grid": [shape.frames, shape.height, shape.width],
           "text_tokens": shape.text, "tokens": layout.seq_len, "padded_tokens": layout.padded_len,
           "block_size": layout.block_size, "blocks": layout.num_blocks, "video_blocks": layout.num_video_blocks,
           "head_dim": shape.head_dim, "model_heads": shape.heads, "heads": heads, "dense_timed_heads": dense_heads,
           "dense_timed_ms": dense_timed, "dense_ms": dense,
           "dense_scaled": f"SDPA timed on {dense_heads} head(s), scaled linearly to {heads}",
           "draft_density": round(plan_from_mask(dmask, layout).density, 4),
           "rect_density": round(plan_from_mask(rmask, layout).density, 4), "row_outliers": outliers}
    for name, ms in times.items():
        row[f"{name}_ms"] = ms
        row[f"{name}_pct"] = 100.0 * ms / dense
    print(f"{shape.name}: {layout.seq_len} tokens ({layout.padded_len} padded), {heads} heads; dense SDPA "
          f"{dense:.1f} ms (timed on {dense_heads} head(s): {dense_timed:.1f} ms)", flush=True)
    for name, ms in times.items():
        print(f"  {name:<16} {ms:9.2f} ms  {100 * ms / dense:6.3f}% of dense", flush=True)
    return row


def run_selection(shape: Shape, device, rep: int, cfg: PooledRectificationConfig) -> dict:
    layout = TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)
    nv = layout.num_video_blocks
    g = torch.Generator(device=device).manual_seed(0)
    pt = torch.softmax(torch.randn(1, shape.heads, nv, nv + 1, generator=g, device=device) * 2.0, -1)
    top_k = cfg.top_k(nv)
    width = selection_width(nv + 1, top_k, cfg.top_p)
    bare = dataclasses.replace(cfg, neighbours=False, first_frame_dense=False)  # the ranked blocks only
    if not torch.equal(select_critical_blocks(pt, layout, bare)[..., :nv, :nv],
                       select_sorted_reference(pt, nv, top_k, cfg.top_p)):
        raise SystemExit(f"{shape.name}: the top-k selection differs from the full sort")
    n = layout.num_blocks

    def full_sort():  # the implementation before: full-row sort, then the same mask assembly (no neighbours)
        mask = forced_mask(layout, diagonal=False, device=device).expand(*pt.shape[:2], n, n).clone()
        mask[..., :nv, :nv] |= select_sorted_reference(pt, nv, top_k, cfg.top_p)
        return mask

    if not torch.equal(full_sort(), select_critical_blocks(pt, layout, bare)):
        raise SystemExit(f"{shape.name}: the assembled full-sort mask differs")
    sort_ms = bench(full_sort, warmup=1, rep=rep)
    bare_ms = bench(lambda: select_critical_blocks(pt, layout, bare), warmup=1, rep=rep)
    row = {"shape": shape.name, "device": str(device), "heads": shape.heads, "video_blocks": nv,
           "candidates": width, "full_sort_ms": sort_ms, "topk_ms": bare_ms, "speedup": sort_ms / bare_ms}
    print(f"{shape.name}: {shape.heads} heads x {nv} query blocks x {nv + 1} entries, {width} candidates; "
          f"full sort {sort_ms:.1f} ms, topk {bare_ms:.1f} ms ({sort_ms / bare_ms:.2f}x)")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="hunyuan-720p,wan2.1-480p,wan2.1-720p")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run on a tiny shape (no numbers worth reporting)")
    ap.add_argument("--selection", action="store_true",
                    help="time rectification's block selection only: full sort vs topk (any device)")
    ap.add_argument("--device", default=None, help="device: 'cpu' runs the CPU stage mode; --selection: default cuda "
                    "if available, else cpu")
    ap.add_argument("--heads", type=int, default=2, help="CPU mode: heads of the plan (dense is scaled to it)")
    ap.add_argument("--dense-heads", type=int, default=1, help="CPU mode: heads of the timed dense SDPA call")
    ap.add_argument("--rep", type=int, default=3, help="CPU mode: timed calls per stage (median)")
    ap.add_argument("--sparsity", type=float, default=0.8, help="--selection: PooledRectificationConfig sparsity")
    ap.add_argument("--top-p", type=float, default=0.3, help="--selection: PooledRectificationConfig top_p")
    args = ap.parse_args(argv)
    if args.selection:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        names = "hunyuan-720p" if args.shapes == ap.get_default("shapes") else args.shapes
        shapes = [Shape("smoke", 4, 16, 32, 2, text=20)] if args.smoke else [SHAPES[s] for s in names.split(",")]
        cfg = PooledRectificationConfig(sparsity=args.sparsity, top_p=args.top_p)
        with torch.no_grad():
            rows = [run_selection(s, device, 2 if args.smoke else 3, cfg) for s in shapes]
        print()
        print_table(rows, ["shape", "device", "video_blocks", "candidates", "full_sort_ms", "topk_ms", "speedup"])
        return 0
    if args.smoke or args.device == "cpu":
        if args.smoke:
            shapes, heads, rep = [Shape("smoke", 4, 16, 32, 2, text=20, head_dim=64)], 2, 2
        else:
            shapes, heads, rep = [SHAPES[s] for s in args.shapes.split(",")], args.heads, args.rep
        if not 1 <= args.dense_heads <= heads:
            raise SystemExit(f"--dense-heads must be in [1, --heads={heads}], got {args.dense_heads}.")
        with torch.no_grad():
            rows = [run_shape_cpu(s, heads, rep, args.dense_heads) for s in shapes]
        print()
        print_table(rows, ["shape", "tokens", "heads", "dense_ms", "draft_plan_ms", "draft_plan_pct", "rect_plan_ms",
                           "rect_plan_pct", "rect_segment_pct"])
        payload = {"environment": environment(), "mode": "cpu", "goal": "plan building <= 5% of one dense call",
                   "command": "python benchmarks/plan_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "rows": rows}
        if args.smoke:
            print("\nsmoke run: nothing written")
        else:
            print(f"\nwrote {write_json('plan_overhead', payload)}")
        return 0
    else:
        if not torch.cuda.is_available():
            print("benchmarks/plan_overhead.py needs a CUDA GPU; pass --device cpu for the CPU stage mode or --smoke "
                  "for a CPU dry run of the script.", file=sys.stderr)
            return 2
        shapes = [SHAPES[s] for s in args.shapes.split(",")]
        device, dtype, rep = "cuda", torch.bfloat16, 20
    with torch.no_grad():
        rows = [run_shape(s, device, dtype, rep) for s in shapes]
    print()
    print_table(rows, ["shape", "dense_ms", "draft_plan_pct", "rectified_plan_pct", "neighbourhood_plan_cached_pct",
                       "reuse_drift_check_pct", "permute_qkv_pct"])
    if not args.smoke:
        print(f"\nwrote {write_json('plan_overhead', {'environment': environment(), 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
