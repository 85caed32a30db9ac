"""Method quality on structured attention: relative output error vs dense at (almost) equal density.

Synthetic q/k/v with spatio-temporal locality, semantic clusters and sinks (``tests/utils.py::structured_qkv``,
correlation length 0.25 of the grid span), an 8x16x24 grid in 1x4x8 tiles (128 blocks), 2 heads of dim 32, float64,
mean of seeds 0 and 1. At each requested sparsity: random blocks (as many per row as the draft keeps, forced text
blocks kept), draft, draft + rectification with the block combine and with the row combine, all on the torch
backend. ``tests/engine/methods/test_engine.py::test_structured_fidelity_ordering`` asserts the ordering on the
same function.

    python benchmarks/structured_quality.py                      # about 1 minute on 2 CPU cores
    python benchmarks/structured_quality.py --smoke              # sparsity 0.9, seed 0; nothing written

Writes benchmarks/results/structured-quality-cpu.json (``--out DIR``: DIR/structured-quality-cpu.json).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import environment, print_table, write_json  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods.base import plan_from_mask  # noqa: E402
from dit_sparse.methods.draft_attention import DraftAttentionConfig, draft_mask  # noqa: E402
from dit_sparse.methods.engine import SparseAttention, SparseAttentionConfig, dense_attention  # noqa: E402
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig  # noqa: E402
from dit_sparse.ops import block_sparse_attention  # noqa: E402

LAYOUT = TokenLayout(frames=8, height=16, width=24, tile=(1, 4, 8))
SPARSITIES = (0.5, 0.75, 0.9)
METHODS = ("random", "draft", "draft+rect", "draft+rect (row)")


def fidelity_errors(layout, sparsity, seeds=(0, 1), noise=0.0, length_scale=0.25) -> dict[str, float]:
    """Relative output error vs dense at (almost) equal density: random blocks, draft, draft+rectification."""
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import rel_error, structured_qkv

    errs: dict[str, list[float]] = {m: [] for m in METHODS}
    for seed in seeds:
        q, k, v = structured_qkv(layout, heads=2, dim=32, seed=seed, noise=noise, length_scale=length_scale)
        dense = dense_attention(q, k, v)
        qp, kp, vp = (layout.permute(t) for t in (q, k, v))
        draft = DraftAttentionConfig(sparsity=sparsity)
        mask = draft_mask(qp, kp, layout, draft)
        # random selection with the same number of blocks per row (forced text blocks kept)
        g = torch.Generator().manual_seed(seed)
        nv = layout.num_video_blocks
        counts = mask[..., :nv, :nv].sum(-1, keepdim=True)
        order = torch.rand(mask[..., :nv, :nv].shape, generator=g).argsort(-1).argsort(-1)
        rnd = mask.clone()
        rnd[..., :nv, :nv] = order < counts
        out_rnd = block_sparse_attention(qp, kp, vp, plan_from_mask(rnd, layout), backend="torch")
        errs["random"].append(rel_error(layout.unpermute(out_rnd), dense))
        for name, cfg in (
            ("draft", SparseAttentionConfig(draft=draft)),
            ("draft+rect", SparseAttentionConfig(draft=draft, rectification=PooledRectificationConfig())),
            (
                "draft+rect (row)",
                SparseAttentionConfig(draft=draft, rectification=PooledRectificationConfig(combine="row")),
            ),
        ):
            out = SparseAttention(dataclasses.replace(cfg, backend="torch"))(q, k, v, layout=layout, step=0)
            errs[name].append(rel_error(out, dense))
    return {k: sum(v) / len(v) for k, v in errs.items()}


def run(sparsities=SPARSITIES, seeds=(0, 1)) -> list[dict]:
    rows = []
    for sparsity in sparsities:
        e = fidelity_errors(LAYOUT, sparsity, seeds=seeds)
        rows.append({"sparsity": sparsity, **{m: round(e[m], 4) for m in METHODS}})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="sparsity 0.9 and seed 0 only; nothing written")
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    seeds = (0,) if args.smoke else (0, 1)
    rows = run((0.9,), seeds) if args.smoke else run()
    print()
    print_table(rows, ["sparsity", *METHODS])
    if args.smoke:
        return 0
    s = LAYOUT
    path = write_json(
        "structured-quality",
        {
            "environment": environment(),
            "grid": list(s.grid),
            "tile": list(s.tile),
            "blocks": s.num_video_blocks,
            "heads": 2,
            "head_dim": 32,
            "seeds": list(seeds),
            "dtype": "float64",
            "rows": rows,
        },
        args.out,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
