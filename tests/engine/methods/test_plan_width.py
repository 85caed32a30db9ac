"""Narrow cached plans: ``plan_row_bound`` bounds every plan row from the config and the layout
alone, temporal reuse keeps only that many ``kv_indices`` columns, and the output is unchanged."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse import TokenLayout
from dit_sparse.methods import engine
from dit_sparse.methods.draft_attention import DraftAttentionConfig, forced_row_max, row_budget
from dit_sparse.methods.engine import DensePolicy, SparseAttention, SparseAttentionConfig, plan_row_bound
from dit_sparse.methods.neighborhood import NeighborhoodConfig
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig
from dit_sparse.methods.temporal_reuse import TemporalReuseConfig

TINY = dict(tile=(1, 4, 4), block_size=16, backend="torch")


def _qkv(layout, seed, heads=2):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, layout.seq_len, heads, 16, generator=g) for _ in range(3))


@settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 4), height=st.integers(2, 9), width=st.integers(2, 13),
       sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95]), selection=st.sampled_from(["row_topk", "row_topp"]),
       k_min=st.integers(1, 4), sink=st.booleans(), same_frame=st.booleans(),
       window=st.sampled_from([None, (1, 3, 3), (3, 3, 3)]), seed=st.integers(0, 2**16))
@torch.no_grad()
def test_bound_covers_every_row(frames, height, width, sparsity, selection, k_min, sink, same_frame, window, seed):
    """On text-free grids (packed edge blocks included) no row of the engine's mask exceeds the bound."""
    layout = TokenLayout(frames=frames, height=height, width=width, tile=(1, 4, 4))
    cfg = SparseAttentionConfig(
        draft=DraftAttentionConfig(sparsity=sparsity, selection=selection, k_min=k_min, sink=sink,
                                   same_frame=same_frame),
        neighborhood=None if window is None else NeighborhoodConfig(window=window), **TINY)
    q, k, _ = (layout.permute(t) for t in _qkv(layout, seed))
    nv = layout.num_video_blocks
    if forced_row_max(layout, cfg.draft) > row_budget(nv, sparsity, k_min):  # refused at plan time
        with pytest.raises(ValueError, match="exceed the row budget"):
            SparseAttention(cfg).build_mask(q, k, layout)
        return
    mask = SparseAttention(cfg).build_mask(q, k, layout)
    assert int(mask.sum(-1).max()) <= plan_row_bound(cfg, layout, ())


def test_no_bound_where_rows_can_read_everything():
    grid = dict(frames=2, height=8, width=12, tile=(1, 4, 4))
    video, text = TokenLayout(**grid), TokenLayout(**grid, text_tokens=5)
    n = video.num_blocks
    draft = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.9), **TINY)
    assert plan_row_bound(draft, video, ()) < n
    assert plan_row_bound(draft, text, ()) == text.num_blocks  # text query rows read every key block
    assert plan_row_bound(draft, video, (1,)) == n  # a dense head
    rect = SparseAttentionConfig(rectification=PooledRectificationConfig(), **TINY)
    assert plan_row_bound(rect, video, ()) == n  # top-p counts depend on the data
    glob = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.9, selection="head_global"), **TINY)
    assert plan_row_bound(glob, video, ()) == n


@pytest.mark.parametrize("cfg", [
    dict(draft=DraftAttentionConfig(sparsity=0.85), reuse=TemporalReuseConfig(refresh_period=3, retention=True)),
    dict(draft=DraftAttentionConfig(sparsity=0.75, selection="row_topp", top_p=0.5),
         neighborhood=NeighborhoodConfig(window=(1, 3, 3)), rectification=PooledRectificationConfig(combine="row"),
         reuse=TemporalReuseConfig(refresh_period=3, retention=False)),
    dict(draft=DraftAttentionConfig(sparsity=0.8), rectification=PooledRectificationConfig(),
         reuse=TemporalReuseConfig(refresh_period=3, retention=False)),
], ids=["draft-retention", "draft-nb-rect-row", "draft-rect-block"])
@torch.no_grad()
def test_reuse_keeps_a_narrow_plan_with_the_same_output(cfg, monkeypatch):
    layout = TokenLayout(frames=3, height=8, width=20, tile=(1, 4, 4))  # 30 blocks, no text
    config = SparseAttentionConfig(**cfg, **TINY)
    kw = dict(layout=layout, num_steps=10, layer=0, branch="cond")
    narrow = SparseAttention(config)
    outs = [narrow(*_qkv(layout, s), step=s, **kw) for s in range(4)]
    width = narrow.reuse_cache.get(0, "cond").plan.kv_indices.shape[-1]
    assert width == plan_row_bound(config, layout, ()) < layout.num_blocks
    n_bytes = narrow.reuse_cache.nbytes()

    monkeypatch.setattr(engine, "plan_row_bound", lambda config, layout, heads: layout.num_blocks)
    wide = SparseAttention(config)
    for s, out in enumerate(outs):
        assert torch.equal(wide(*_qkv(layout, s), step=s, **kw), out)
    assert wide.reuse_cache.get(0, "cond").plan.kv_indices.shape[-1] == layout.num_blocks
    saved = 4 * 2 * layout.num_blocks * (layout.num_blocks - width)  # int32, 2 heads, N rows
    assert wide.reuse_cache.nbytes() - n_bytes == saved


@torch.no_grad()
def test_a_wrong_bound_is_caught_with_checks(monkeypatch):
    layout = TokenLayout(frames=2, height=8, width=12, tile=(1, 4, 4))
    config = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.5), dense=DensePolicy(),
                                   reuse=TemporalReuseConfig(refresh_period=2, retention=False), **TINY)
    monkeypatch.setattr(engine, "plan_row_bound", lambda config, layout, heads: 1)
    monkeypatch.setenv("DIT_SPARSE_CHECKS", "1")
    with pytest.raises(ValueError, match="plan_width=1 is below"):
        SparseAttention(config)(*_qkv(layout, 0), layout=layout, step=0, layer=0, branch="cond")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_backends_read_a_narrowed_plan_as_the_full_one(backend):
    """A plan cut to its row bound (``W < Mk``) gives bit-identical output to the full-width plan (Triton in the
    interpreter on CPU)."""
    from dit_sparse import block_sparse_attention
    from dit_sparse.methods.base import plan_from_mask
    from dit_sparse.methods.temporal_reuse import _narrowed

    layout = TokenLayout(frames=2, height=8, width=12, tile=(1, 4, 4))  # 12 blocks of 16
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.75, sink=False), **TINY)
    q, k, v = (layout.permute(t) for t in _qkv(layout, 3))
    mask = SparseAttention(cfg).build_mask(q, k, layout)
    full = plan_from_mask(mask, layout)
    width = plan_row_bound(cfg, layout, ())
    narrow = _narrowed(full, width)
    assert narrow.kv_indices.shape[-1] == width < layout.num_blocks
    assert torch.equal(narrow.to_dense(), full.to_dense())
    assert torch.equal(block_sparse_attention(q, k, v, narrow, backend=backend),
                       block_sparse_attention(q, k, v, full, backend=backend))
