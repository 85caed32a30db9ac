"""Forced blocks (dit_sparse.methods.forced): counted from the config, and measured as the blocks the engine keeps
for every one of several unrelated inputs; the count is in every mask, and the two agree up to chance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from utils import structured_family

from dit_sparse import TokenLayout
from dit_sparse.methods.draft_attention import DraftAttentionConfig, row_budget
from dit_sparse.methods.engine import DensePolicy, SparseAttention, SparseAttentionConfig
from dit_sparse.methods.forced import forced_blocks, forced_video_mask, measured_forced, selection_budget
from dit_sparse.methods.neighborhood import NeighborhoodConfig
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig

# Wan-like: a 4-frame temporal tile, so the former sink (every block holding frame 0) is a whole tile row
LAYOUT = TokenLayout(frames=12, height=16, width=32, tile=(4, 4, 8), text_tokens=5)


def _inputs(layout, n=4):
    out = []
    for seed in range(n // 2):
        g = torch.Generator().manual_seed(seed)
        out.append(tuple(layout.permute(torch.randn(1, layout.seq_len, 2, 16, generator=g)) for _ in range(2)))
    for fam in ("local", "sharp_sparse")[: n - n // 2]:
        q, k, _ = structured_family(layout, fam, heads=2, dim=16, dtype=torch.float32)
        out.append((layout.permute(q), layout.permute(k)))
    return out


@pytest.mark.parametrize(
    "cfg, method, forced, budget",
    [
        (SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.5, sink_share=None)), "draft", 17, 24),
        (SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.5)), "draft", 1, 24),
        (SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.5, sink=False)), "draft", 1, 24),
        (SparseAttentionConfig(rectification=PooledRectificationConfig(sparsity=0.5)), "rectification", 27, 24),
        (
            SparseAttentionConfig(rectification=PooledRectificationConfig(sparsity=0.5, neighbour_share=0.25)),
            "rectification",
            6,
            24,
        ),
    ],
)
def test_counted_forced_blocks_are_in_every_mask(cfg, method, forced, budget):
    f = forced_blocks(cfg, LAYOUT)
    assert (f.method, f.forced_max, f.budget, f.video_blocks) == (method, forced, budget, 48)
    assert f.share == forced / budget and selection_budget(cfg, LAYOUT) == budget
    inputs = _inputs(LAYOUT)
    fm = forced_video_mask(cfg, LAYOUT)
    for q, k in inputs:  # the counted forced blocks are kept whatever the input
        mask = SparseAttention(cfg).build_mask(q, k, LAYOUT)[..., :48, :48]
        assert bool((mask >= fm).all())
    m = measured_forced(cfg, LAYOUT, inputs)
    assert m.forced_mean >= f.forced_mean - 1e-9 and m.forced_max >= f.forced_max
    assert m.reserved == 0 and 0 < m.density <= 1
    # the honest count agrees with the counted one up to the blocks 4 unrelated inputs share by chance
    assert m.mean_share - f.mean_share < 0.1, (m, f)


def test_sink_share_reserves_but_does_not_force():
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.5, sink_share=0.25))
    f = forced_blocks(cfg, LAYOUT)
    assert (f.forced_max, f.reserved, f.budget) == (1, 6, 24)
    assert f.committed_share == 7 / 24
    whole = forced_blocks(dataclasses.replace(cfg, draft=dataclasses.replace(cfg.draft, sink_share=None)), LAYOUT)
    assert (whole.forced_max, whole.reserved) == (17, 0)
    # measured on the same input twice, everything it selects looks forced: inputs must be unrelated
    q, k = (t[:, :, :1] for t in _inputs(LAYOUT, 2)[0])  # one head (heads count as inputs too)
    same = measured_forced(cfg, LAYOUT, [(q, k), (q, k)])
    assert same.forced_max == row_budget(48, 0.5, 2)


def test_window_has_no_budget_and_errors():
    win = SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(1, 3, 3)))
    f = forced_blocks(win, LAYOUT)
    assert f.method == "window" and f.budget is None and f.share is None and f.forced_max == 9
    with pytest.raises(ValueError, match="no inputs given"):
        measured_forced(win, LAYOUT, [])
    dense = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
    with pytest.raises(ValueError, match="no selector"):
        forced_blocks(dense, LAYOUT)
