"""The rectification statistics computed a few video blocks at a time give the very same tensors (``torch.equal``)
as the implementation before (whole-tensor temporaries, kept below verbatim as the reference), for any chunk size:
so every plan, epilogue and pooled segment built from them is unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse import TokenLayout
from dit_sparse.methods.pooled_rectification import (
    PooledRectificationConfig,
    block_statistics,
    ipar_probabilities,
    pooled_segment,
    rectified_plan,
    select_critical_blocks,
)
from dit_sparse.methods.rectification import statistics
from dit_sparse.methods.rectification.statistics import _video_ranks_real


# ------------------------------------------------------------------ the implementation before (reference)
def _mean_abs_deviation_before(x: torch.Tensor, mean: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(before) ``mean_{real u in block} |x_u - mean_block|`` for the video blocks -> float32 ``[B, H, Nv, D]``."""
    b, _, h, d = x.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    xv = x[:, : nv * bs].reshape(b, nv, bs, h, d).to(torch.float32)
    valid = layout.block_valid(x.device)[:nv].to(torch.float32)
    real = _video_ranks_real(layout, bs, x.device).to(torch.float32)  # [Nv, Bs]
    dev = (xv - mean.permute(0, 2, 1, 3).unsqueeze(2)).abs_()  # [B, Nv, Bs, H, D]
    dev = torch.einsum("bnshd,ns->bhnd", dev, real)
    return dev / valid.view(1, 1, nv, 1)


def _block_outliers_before(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, layout: TokenLayout, m: int):
    """The ``m`` most deviating real keys of each video block (largest ``||k_t - k̄_j||`` first, lowest slot among
    exact ties) and their values -> float32 ``[B, H, Nv, m, D]`` twice (zeros at ranks ``>= n_j``)."""
    b, _, h, d = k.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    kv = k[:, : nv * bs].reshape(b, nv, bs, h, d).to(torch.float32)
    vv = v[:, : nv * bs].reshape(b, nv, bs, h, -1).to(torch.float32)
    dist = (kv - k_mean.permute(0, 2, 1, 3).unsqueeze(2)).square().sum(-1)  # [B, Nv, Bs, H]
    real = _video_ranks_real(layout, bs, k.device)
    dist = dist.masked_fill(~real.view(1, nv, bs, 1), -1.0)
    # a stable descending sort keeps equal distances in slot order: the lowest slot first among exact ties;
    # padding slots (-1) sort after every real key
    mm = min(m, bs)  # ranks past the block size hold no token (zeros below, never read)
    idx = torch.sort(dist, dim=2, descending=True, stable=True).indices[:, :, :mm]  # [B, Nv, mm, H]
    keep = _video_ranks_real(layout, mm, k.device).view(1, nv, mm, 1, 1).to(torch.float32)
    k_out = kv.gather(2, idx.unsqueeze(-1).expand(b, nv, mm, h, d)) * keep
    v_out = vv.gather(2, idx.unsqueeze(-1).expand(b, nv, mm, h, vv.shape[-1])) * keep
    if mm < m:
        k_out = torch.cat([k_out, k_out.new_zeros(b, nv, m - mm, h, d)], 2)
        v_out = torch.cat([v_out, v_out.new_zeros(b, nv, m - mm, h, vv.shape[-1])], 2)
    return k_out.permute(0, 3, 1, 2, 4).contiguous(), v_out.permute(0, 3, 1, 2, 4).contiguous()


# ------------------------------------------------------------------ the tests
def _inputs(layout, batch, heads, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim, generator=g).mul(1 + i).to(dtype) for i in range(3))
    return tuple(layout.permute(t) for t in (q, k, v))


LAYOUTS = st.builds(
    lambda f, h, w, text, pos, packing, bs: TokenLayout(frames=f, height=h, width=w, text_tokens=text,
                                                        text_position=pos, packing=packing, block_size=bs),
    st.integers(1, 6), st.integers(1, 19), st.integers(1, 23), st.integers(0, 21),
    st.sampled_from(["before", "after"]), st.sampled_from(["packed", "tiled"]), st.sampled_from([16, 32, 64]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=LAYOUTS, batch=st.integers(1, 2), heads=st.integers(1, 3), dim=st.sampled_from([8, 24]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), outliers=st.integers(1, 3),
       chunk=st.sampled_from([0, 1, 2, 3, 5, None]), seed=st.integers(0, 2**16))
def test_statistics_equal_the_implementation_before(layout, batch, heads, dim, dtype, outliers, chunk, seed):
    """``chunk``: video blocks per chunk (0: one element, i.e. the smallest chunks; None: the default)."""
    qp, kp, vp = _inputs(layout, batch, heads, dim, dtype, seed)
    k_mean = block_statistics(qp, kp, vp, layout, deviations=False).k_mean
    q_mean = block_statistics(qp, kp, vp, layout, deviations=False).q_mean
    old_dev = (_mean_abs_deviation_before(qp, q_mean, layout), _mean_abs_deviation_before(kp, k_mean, layout))
    old_out = _block_outliers_before(kp, vp, k_mean, layout, outliers)
    with pytest.MonkeyPatch.context() as mp:
        if chunk is not None:
            mp.setattr(statistics, "STAT_CHUNK", max(1, chunk * batch * layout.block_size * heads * dim))
        stats = block_statistics(qp, kp, vp, layout, outliers=outliers)
    assert torch.equal(stats.q_dev, old_dev[0]) and torch.equal(stats.k_dev, old_dev[1])
    assert torch.equal(stats.k_out, old_out[0]) and torch.equal(stats.v_out, old_out[1])


@pytest.mark.parametrize("layout", [TokenLayout(frames=5, height=9, width=13, text_tokens=7),
                                    TokenLayout(frames=3, height=17, width=10, text_tokens=20, text_position="before"),
                                    TokenLayout(frames=6, height=12, width=20, packing="tiled")], ids=repr)
@pytest.mark.parametrize("combine", ["block", "row"])
def test_plans_and_segments_equal_the_implementation_before(layout, combine, monkeypatch):
    """The block plan (CSR and epilogue) and the row mode's pooled segment from the chunked statistics (the smallest
    chunks) equal the ones built from the statistics of the implementation before."""
    qp, kp, vp = _inputs(layout, 2, 3, 32, torch.float32, seed=11)
    cfg = PooledRectificationConfig(sparsity=0.85, combine=combine)
    monkeypatch.setattr(statistics, "STAT_CHUNK", 1)
    new = rectified_plan(qp, kp, vp, layout, cfg) if combine == "block" else None
    stats = block_statistics(qp, kp, vp, layout, outliers=2)
    monkeypatch.setattr(statistics, "_mean_abs_deviation", _mean_abs_deviation_before)
    monkeypatch.setattr(statistics, "_block_outliers", _block_outliers_before)
    old_stats = block_statistics(qp, kp, vp, layout, outliers=2)
    if combine == "block":
        old = rectified_plan(qp, kp, vp, layout, cfg)
        for name in ("kv_num_blocks", "kv_indices", "out_scale", "out_bias"):
            assert torch.equal(getattr(new, name), getattr(old, name)), name
    for name in ("q_dev", "k_dev", "k_out", "v_out"):
        assert torch.equal(getattr(stats, name), getattr(old_stats, name)), name
    row = dataclasses.replace(cfg, combine="row")
    mask = select_critical_blocks(ipar_probabilities(old_stats, 32 ** -0.5), layout, row)
    seg_new, seg_old = (pooled_segment(layout, mask, row, stats=s) for s in (stats, old_stats))
    for name in ("keys", "values", "log_count", "read"):
        assert torch.equal(getattr(seg_new, name), getattr(seg_old, name)), name
