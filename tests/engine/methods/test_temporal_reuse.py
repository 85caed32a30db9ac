"""Temporal reuse (plan reuse + Re-ttention, docs/temporal_reuse.md): oracle, exactness, schedule, state, memory."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import TokenLayout, block_sparse_attention, dense_attention_lse
from dit_sparse.methods.base import forced_mask, plan_from_mask, pool_blocks
from dit_sparse.methods.temporal_reuse import (
    ReuseCache,
    TemporalReuseConfig,
    TemporalReuseState,
    pooled_query_drift,
    retention_terms,
    reuse_attention,
)
from dit_sparse.reference.retention import retention_terms_reference
from tests.utils import rel_error, structured_qkv

BACKEND = "torch"

# small awkward layouts: partial tiles, text after / before, tiles larger than a frame (the fuzz adds grids
# smaller than one tile)
LAYOUTS = {
    "partial_text_after": TokenLayout(frames=2, height=5, width=7, tile=(1, 2, 4), text_tokens=5),
    "3d_tile_text_before": TokenLayout(frames=3, height=3, width=5, tile=(2, 2, 2), text_tokens=3,
                                       text_position="before"),
    "tile_larger_than_frame": TokenLayout(frames=3, height=3, width=3, tile=(1, 4, 4)),
}


# ---------------------------------------------------------------------------------------------------- helpers
def _random_mask(layout: TokenLayout, batch: int, heads: int, density: float, seed: int) -> torch.Tensor:
    """Per-(batch, head) random video x video selection plus the forced blocks, bool [B, H, N, N]."""
    g = torch.Generator().manual_seed(seed)
    n = layout.num_blocks
    m = torch.rand(batch, heads, n, n, generator=g) < density
    return m | forced_mask(layout)


def _topk_mask(qp: torch.Tensor, kp: torch.Tensor, layout: TokenLayout, density: float) -> torch.Tensor:
    """A data-dependent mask source: top-k pooled scores per video row, plus the forced blocks."""
    qb, kb = pool_blocks(qp, layout), pool_blocks(kp, layout)
    nv = layout.num_video_blocks
    s = qb[:, :, :nv] @ kb[:, :, :nv].transpose(-1, -2)
    idx = s.topk(max(1, round(density * nv)), -1).indices
    sel = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, idx, True)
    out = forced_mask(layout).expand(*s.shape[:2], -1, -1).clone()
    out[:, :, :nv, :nv] |= sel
    return out


def _permuted(layout: TokenLayout, dtype=torch.float64, **kw):
    q, k, v = structured_qkv(layout, dtype=dtype, **kw)
    return tuple(layout.permute(t) for t in (q, k, v))


def _dense(qp, kp, vp, layout):
    bs = layout.block_size
    return dense_attention_lse(qp, kp, vp, block_q=bs, block_k=bs, kv_block_valid=layout.block_valid(qp.device),
                               backend=BACKEND)


def _sparse(qp, kp, vp, layout, mask):
    return block_sparse_attention(qp, kp, vp, plan_from_mask(mask, layout), backend=BACKEND)


class _Counter:
    """A build_mask callable that counts its calls and records the steps."""

    def __init__(self, fn):
        self.fn, self.calls, self.steps, self.step = fn, 0, [], None

    def __call__(self):
        self.calls += 1
        self.steps.append(self.step)
        return self.fn()


def _run(qp, kp, vp, layout, step, state, config, mask_fn, **kw):
    return reuse_attention(qp, kp, vp, layout, step=step, state=state, config=config, build_mask=mask_fn,
                           backend=BACKEND, **kw)


F64 = dict(residual_dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- (1) oracle
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_rho_and_residual_match_float64_oracle(name):
    layout = LAYOUTS[name]
    qp, kp, vp = _permuted(layout, batch=2, heads=3, dim=8, seed=3)
    mask = _random_mask(layout, 2, 3, 0.3, seed=4)
    state = TemporalReuseState()
    _run(qp, kp, vp, layout, 0, state, TemporalReuseConfig(**F64), lambda: mask)
    rho_ref, res_ref, _, _ = retention_terms_reference(qp, kp, vp, mask, layout)
    assert state.rho.dtype == torch.float32 and state.rho.shape == (2, 3, layout.padded_len)
    assert state.residual.dtype == torch.float64 and state.residual.shape == qp.shape
    assert bool(((state.rho > 0) & (state.rho <= 1 + 1e-6)).all())
    torch.testing.assert_close(state.rho.double(), rho_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(state.residual, res_ref, rtol=1e-5, atol=1e-5)
    # the mask really drops mass somewhere (else the test proves nothing)
    assert float(rho_ref.min()) < 0.9


def test_residual_dtype_default_bf16_and_broadcast_mask():
    layout = LAYOUTS["partial_text_after"]
    qp, kp, vp = _permuted(layout, batch=2, heads=2, dim=8, seed=5, dtype=torch.float32)
    mask = forced_mask(layout)[None, None]  # data-independent [1, 1, N, N]
    state = TemporalReuseState()
    _run(qp, kp, vp, layout, 0, state, TemporalReuseConfig(), lambda: mask)
    rho_ref, res_ref, _, _ = retention_terms_reference(qp, kp, vp, mask, layout)
    assert state.residual.dtype == torch.bfloat16 and state.rho.shape == (2, 2, layout.padded_len)
    torch.testing.assert_close(state.rho.double(), rho_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(state.residual.double(), res_ref, rtol=1.6e-2, atol=1.6e-2)


def test_retention_terms_rows_without_keys_are_finite():
    """Padding-like rows (lse_full = -inf) and empty sparse rows (lse_sparse = -inf) never produce NaN."""
    lse_full = torch.tensor([[[0.5, float("-inf"), 1.0]]])
    lse_sparse = torch.tensor([[[0.0, float("-inf"), float("-inf")]]])
    o_full = torch.tensor([1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4).contiguous()
    o_sparse = torch.tensor([3.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4).contiguous()
    rho, res = retention_terms(o_full, lse_full, o_sparse, lse_sparse, residual_dtype=torch.float32)
    assert torch.isfinite(rho).all() and torch.isfinite(res).all()
    torch.testing.assert_close(rho, torch.tensor([[[math.exp(-0.5), 1.0, 0.0]]]))
    torch.testing.assert_close(res[0, :, 0, 0], torch.tensor([1.0 - 3.0 * math.exp(-0.5), 0.0, 2.0]))


# ---------------------------------------------------------------------------------------------------- (2), (3)
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_cache_step_returns_dense_and_unchanged_inputs_reproduce_dense(name):
    layout = LAYOUTS[name]
    qp, kp, vp = _permuted(layout, batch=2, heads=2, dim=8, seed=7)
    mask = _random_mask(layout, 2, 2, 0.25, seed=8)
    dense, _ = _dense(qp, kp, vp, layout)
    _, _, oracle_full, _ = retention_terms_reference(qp, kp, vp, mask, layout)
    sparse = _sparse(qp, kp, vp, layout, mask)
    assert rel_error(sparse, dense) > 1e-2  # the mask alone is visibly wrong
    state, cfg = TemporalReuseState(), TemporalReuseConfig(ratio_slope=0.0, **F64)
    out0 = _run(qp, kp, vp, layout, 10, state, cfg, lambda: mask)
    assert torch.equal(out0, dense)  # (2) the cache step is the dense call itself
    torch.testing.assert_close(out0, oracle_full, rtol=1e-10, atol=1e-10)
    for dt in (1, 2, 4):  # (3) λ = 0, unchanged q/k/v: (rho O_sparse + R) == O_full
        out = _run(qp, kp, vp, layout, 10 + dt, state, cfg, lambda: mask)
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)
    assert state.num_builds == 1


def test_default_bf16_residual_reproduces_dense_to_bf16_rounding():
    layout = LAYOUTS["partial_text_after"]
    qp, kp, vp = _permuted(layout, heads=2, dim=16, seed=9, dtype=torch.float32)
    mask = _random_mask(layout, 1, 2, 0.25, seed=10)
    dense, _ = _dense(qp, kp, vp, layout)
    state, cfg = TemporalReuseState(), TemporalReuseConfig(ratio_slope=0.0)
    _run(qp, kp, vp, layout, 0, state, cfg, lambda: mask)
    out = _run(qp, kp, vp, layout, 1, state, cfg, lambda: mask)
    plain = _sparse(qp, kp, vp, layout, mask)
    assert rel_error(out, dense) < 5e-3 < rel_error(plain, dense)


@pytest.mark.parametrize("slope,clamp,store", [(0.04, False, True), (0.3, True, True), (0.04, False, False),
                                               (0.5, True, False)])
def test_sparse_step_epilogue_formula(slope, clamp, store):
    """O_t = min?(rho + λΔt, 1) * O_sparse,t (+ R): with unchanged inputs the deviation from dense is λΔt O_sparse."""
    layout = LAYOUTS["3d_tile_text_before"]
    qp, kp, vp = _permuted(layout, batch=1, heads=2, dim=8, seed=11)
    mask = _random_mask(layout, 1, 2, 0.3, seed=12)
    dense, _ = _dense(qp, kp, vp, layout)
    sparse = _sparse(qp, kp, vp, layout, mask)
    rho_ref, res_ref, _, _ = retention_terms_reference(qp, kp, vp, mask, layout)
    cfg = TemporalReuseConfig(ratio_slope=slope, clamp_ratio=clamp, store_residual=store, **F64)
    state = TemporalReuseState()
    _run(qp, kp, vp, layout, 3, state, cfg, lambda: mask)
    for dt in (1, 3):
        out = _run(qp, kp, vp, layout, 3 + dt, state, cfg, lambda: mask)
        ratio = rho_ref + slope * dt
        if clamp:
            ratio = ratio.clamp(max=1.0)
        expected = ratio.transpose(1, 2).unsqueeze(-1) * sparse + (res_ref if store else 0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if store and not clamp:
            torch.testing.assert_close(out - dense, slope * dt * sparse, rtol=1e-5, atol=1e-5)
    if not store:
        assert state.residual is None


# ---------------------------------------------------------------------------------------------------- (4)
def test_refresh_period_one_equals_fresh_plan_every_step():
    layout = LAYOUTS["partial_text_after"]
    q0, k0, v0 = _permuted(layout, batch=2, heads=2, dim=8, seed=13, dtype=torch.float32)
    g = torch.Generator().manual_seed(14)
    cfg = TemporalReuseConfig(refresh_period=1, retention=False)
    state = TemporalReuseState()
    masks = []
    for step in range(4):
        qp, kp = (t + 0.5 * step * torch.randn(t.shape, generator=g) for t in (q0, k0))
        fn = _Counter(lambda qp=qp, kp=kp: _topk_mask(qp, kp, layout, 0.3))
        out = _run(qp, kp, v0, layout, step, state, cfg, fn)
        fresh = _sparse(qp, kp, v0, layout, _topk_mask(qp, kp, layout, 0.3))
        assert fn.calls == 1 and torch.equal(out, fresh)
        masks.append(state.mask)
    assert state.num_builds == 4
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the inputs really changed the plan


# ---------------------------------------------------------------------------------------------------- (5)
@pytest.mark.parametrize("eps", [0.01, 0.05])
def test_retention_beats_plain_reuse_on_drifting_structured_inputs(eps):
    layout = TokenLayout(frames=3, height=8, width=12, tile=(1, 4, 4), text_tokens=6)
    q0, k0, v0 = structured_qkv(layout, heads=2, dim=16, seed=15, dtype=torch.float32)
    g = torch.Generator().manual_seed(16)
    dirs = [torch.randn(t.shape, generator=g) * t.std() for t in (q0, k0, v0)]
    cfg_ret = TemporalReuseConfig(refresh_period=100, ratio_slope=0.0, residual_dtype=torch.float32)
    cfg_plain = TemporalReuseConfig(refresh_period=100, retention=False)
    s_ret, s_plain = TemporalReuseState(), TemporalReuseState()
    errs = []
    for step in range(5):
        qp, kp, vp = (layout.permute(t + eps * step * d) for t, d in zip((q0, k0, v0), dirs))
        fn = lambda qp=qp, kp=kp: _topk_mask(qp, kp, layout, 0.2)
        o_ret = _run(qp, kp, vp, layout, step, s_ret, cfg_ret, fn)
        o_plain = _run(qp, kp, vp, layout, step, s_plain, cfg_plain, fn)
        dense, _ = _dense(qp, kp, vp, layout)
        errs.append((rel_error(layout.unpermute(o_ret), layout.unpermute(dense)),
                     rel_error(layout.unpermute(o_plain), layout.unpermute(dense))))
    assert s_ret.num_builds == s_plain.num_builds == 1
    assert torch.equal(s_ret.mask, s_plain.mask)  # same reused plan
    assert errs[0][0] < 1e-6
    for e_ret, e_plain in errs:
        assert e_ret < e_plain
    assert errs[1][0] < errs[-1][0]  # the correction ages: error grows with Δt


# ---------------------------------------------------------------------------------------------------- (6)
@pytest.mark.parametrize("retention", [False, True])
@pytest.mark.parametrize("period,steps,expected", [
    (3, range(10), [0, 3, 6, 9]),
    (1, range(4), [0, 1, 2, 3]),
    (3, [0, 2, 4, 7, 8], [0, 4, 7]),
    (5, [2, 3, 4, 0, 1, 5], [2, 0, 5]),  # a step going backwards (new generation without reset) rebuilds
])
def test_build_mask_called_at_expected_steps(period, steps, expected, retention):
    layout = LAYOUTS["tile_larger_than_frame"]
    qp, kp, vp = _permuted(layout, heads=1, dim=8, seed=17)
    mask = forced_mask(layout)
    fn = _Counter(lambda: mask)
    state, cfg = TemporalReuseState(), TemporalReuseConfig(refresh_period=period, retention=retention)
    for step in steps:
        fn.step = step
        _run(qp, kp, vp, layout, step, state, cfg, fn)
    assert fn.steps == expected and state.num_builds == len(expected)
    if retention:
        assert state.cache_step == expected[-1] == state.built_step


def test_drift_threshold_triggers_rebuild():
    layout = LAYOUTS["partial_text_after"]
    qa, kp, vp = _permuted(layout, heads=2, dim=8, seed=18)
    qb, _, _ = _permuted(layout, heads=2, dim=8, seed=19)  # a different structured query field
    inputs = {0: qa, 1: qa, 2: qa * 3.0, 3: qa + 1e-3 * qb, 4: qb, 5: qb, 6: qa}
    cfg = TemporalReuseConfig(refresh_period=100, drift_threshold=0.05)
    fn = _Counter(lambda: _random_mask(layout, 1, 2, 0.3, 0))
    state = TemporalReuseState()
    for step, q in inputs.items():
        fn.step = step
        _run(q, kp, vp, layout, step, state, cfg, fn)
    # scaling (step 2) and a tiny perturbation (step 3) do not rotate pooled q; a new field (4, 6) does
    assert fn.steps == [0, 4, 6]
    assert state.q_ref.shape == (1, 2, layout.num_video_blocks, 8)
    drift = pooled_query_drift(pool_blocks(qb, layout)[:, :, : layout.num_video_blocks], state.q_ref)
    assert drift.shape == (1,) and float(drift) > 0.05


def test_pooled_query_drift_values():
    a = torch.zeros(2, 1, 2, 2)
    a[..., 0] = 1.0
    b = a.clone()
    b[1, 0, 0] = torch.tensor([0.0, 1.0])  # sample 1, block 0 rotated by 90 degrees
    b[1, 0, 1] = torch.tensor([-1.0, 0.0])  # sample 1, block 1 flipped
    torch.testing.assert_close(pooled_query_drift(b, a), torch.tensor([0.0, 1.5]))


def test_layout_or_shape_change_rebuilds():
    layout_a, layout_b = LAYOUTS["partial_text_after"], LAYOUTS["3d_tile_text_before"]
    state, cfg = TemporalReuseState(), TemporalReuseConfig(refresh_period=100)
    calls = []
    for step, (layout, batch) in enumerate([(layout_a, 1), (layout_a, 1), (layout_b, 1), (layout_b, 2),
                                            (layout_b, 2)]):
        qp, kp, vp = _permuted(layout, batch=batch, heads=2, dim=8, seed=20)
        out = _run(qp, kp, vp, layout, step, state, cfg,
                   lambda s=step, lay=layout: (calls.append(s), forced_mask(lay))[1])
        assert out.shape == qp.shape and torch.isfinite(out).all()
    assert calls == [0, 2, 3]


# ---------------------------------------------------------------------------------------------------- (7)
def test_reset_clears_state_and_branches_are_independent():
    layout = LAYOUTS["partial_text_after"]
    cond = _permuted(layout, heads=2, dim=8, seed=21)
    uncond = _permuted(layout, heads=2, dim=8, seed=22)
    cfg = TemporalReuseConfig(refresh_period=3, **F64)
    mask = _random_mask(layout, 1, 2, 0.3, seed=23)
    cache = ReuseCache(cfg)
    s_c, s_u = cache.get(0, "cond"), cache.get(0, "uncond")
    assert s_c is not s_u and s_c is cache.get(0, "cond") and cache[(0, "cond")] is s_c
    assert s_c is not cache.get(1, "cond") and len(cache) == 3 and (0, "uncond") in cache
    assert (2, "cond") not in cache and set(cache) == {(0, "cond"), (0, "uncond"), (1, "cond")}
    solo = TemporalReuseState()
    solo_out = [_run(*cond, layout, t, solo, cfg, lambda: mask) for t in range(4)]
    for t in range(4):  # interleaved CFG calls: the uncond branch must not disturb the cond one
        out_c = _run(*cond, layout, t, s_c, cfg, lambda: mask)
        _run(*uncond, layout, t, s_u, cfg, lambda: mask)
        assert torch.equal(out_c, solo_out[t])
    assert not torch.equal(s_c.residual, s_u.residual)
    assert cache.nbytes() > 0
    cache.reset()
    for s in (s_c, s_u):
        assert s.plan is None and s.rho is None and s.residual is None and s.q_ref is None
        assert s.built_step is None and s.cache_step is None and s.num_builds == 0 and s.nbytes == 0
    assert cache.nbytes() == 0 and len(cache) == 3
    fn = _Counter(lambda: mask)
    _run(*cond, layout, 1, s_c, cfg, fn)  # after reset the next call rebuilds, whatever the step
    assert fn.calls == 1 and s_c.built_step == 1


# ---------------------------------------------------------------------------------------------------- (8)
@pytest.mark.parametrize("store,dtype,drift", [(True, torch.bfloat16, None), (True, torch.float32, 0.1),
                                               (False, torch.bfloat16, 0.1)])
def test_nbytes_matches_cached_tensors(store, dtype, drift):
    layout = LAYOUTS["partial_text_after"]
    b, h, d = 2, 3, 8
    qp, kp, vp = _permuted(layout, batch=b, heads=h, dim=d, seed=24, dtype=torch.float32)
    cfg = TemporalReuseConfig(store_residual=store, residual_dtype=dtype, drift_threshold=drift)
    cache = ReuseCache(cfg)
    state = cache.get("block.0", "cond")
    _run(qp, kp, vp, layout, 0, state, cfg, lambda: _random_mask(layout, b, h, 0.3, 25))
    p, n, nv = layout.padded_len, layout.num_blocks, layout.num_video_blocks
    plan = state.plan
    expected = b * h * n * 4 + plan.kv_indices.numel() * 4  # CSR tables, int32
    expected += b * h * p * 4  # rho, fp32
    expected += b * p * h * d * dtype.itemsize if store else 0
    expected += b * h * nv * d * 4 if drift is not None else 0
    assert plan.kv_num_blocks.shape == (b, h, n)
    assert (state.residual is not None) == store and (state.q_ref is not None) == (drift is not None)
    assert state.nbytes == expected == cache.nbytes()
    if store:
        assert state.residual.dtype == dtype


def test_memory_warning_fires_once_above_warn_bytes():
    layout = LAYOUTS["partial_text_after"]
    qp, kp, vp = _permuted(layout, heads=2, dim=8, seed=26, dtype=torch.float32)
    cfg = TemporalReuseConfig(refresh_period=1, warn_bytes=1000)
    cache = ReuseCache(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            for branch in ("cond", "uncond"):
                _run(qp, kp, vp, layout, step, cache.get(0, branch), cfg, lambda: forced_mask(layout))
    msgs = [str(w.message) for w in caught if "warn_bytes" in str(w.message)]
    assert all(w.category is UserWarning for w in caught if "warn_bytes" in str(w.message))
    assert len(msgs) == 1 and cache.nbytes() > 1000
    assert "bytes" in msgs[0] and "warn_bytes=1000" in msgs[0]
    # below the limit: no warning
    cfg_big = TemporalReuseConfig(warn_bytes=10**9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(qp, kp, vp, layout, 0, ReuseCache(cfg_big).get(0, "cond"), cfg_big, lambda: forced_mask(layout))
    assert not [w for w in caught if "warn_bytes" in str(w.message)]


# ---------------------------------------------------------------------------------------------------- epilogue
def test_caller_epilogue_on_reuse_and_refusal_with_retention():
    layout = LAYOUTS["partial_text_after"]
    qp, kp, vp = _permuted(layout, heads=2, dim=8, seed=27)
    mask = _random_mask(layout, 1, 2, 0.3, 28)
    sparse = _sparse(qp, kp, vp, layout, mask)
    seen = []

    def epi(plan):
        seen.append(plan.has_epilogue)
        return plan.with_epilogue(torch.full((1, 2, plan.seq_q), 2.0, dtype=torch.float32))

    state, cfg = TemporalReuseState(), TemporalReuseConfig(retention=False)
    for step in range(3):
        out = _run(qp, kp, vp, layout, step, state, cfg, lambda: mask, epilogue=epi)
        torch.testing.assert_close(out, 2.0 * sparse)
    assert seen == [False] * 3 and not state.plan.has_epilogue  # the cached plan stays clean
    with pytest.raises(NotImplementedError, match="not combined"):
        _run(qp, kp, vp, layout, 0, TemporalReuseState(), TemporalReuseConfig(), lambda: mask, epilogue=epi)


def test_fp8_residual_and_padding_rows_finite():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")
    layout = LAYOUTS["3d_tile_text_before"]  # partial tiles: padding query slots
    qp, kp, vp = _permuted(layout, heads=2, dim=8, seed=29, dtype=torch.float32)
    mask = _random_mask(layout, 1, 2, 0.3, 30)
    cfg = TemporalReuseConfig(residual_dtype=torch.float8_e4m3fn, ratio_slope=0.0)
    state = TemporalReuseState()
    _run(qp, kp, vp, layout, 0, state, cfg, lambda: mask)
    out = _run(qp, kp, vp, layout, 1, state, cfg, lambda: mask)
    dense, _ = _dense(qp, kp, vp, layout)
    assert torch.isfinite(out).all() and torch.isfinite(state.rho).all()
    assert rel_error(out, dense) < 0.1 * rel_error(_sparse(qp, kp, vp, layout, mask), dense)


# ---------------------------------------------------------------------------------------------------- (9)
@pytest.mark.parametrize("kwargs", [
    dict(refresh_period=0), dict(refresh_period=2.0), dict(refresh_period=True), dict(retention=1),
    dict(ratio_slope=-0.1), dict(ratio_slope=float("nan")), dict(ratio_slope="0.04"), dict(clamp_ratio=None),
    dict(store_residual="yes"), dict(residual_dtype=torch.int8), dict(residual_dtype="bf16"),
    dict(drift_threshold=-0.01), dict(drift_threshold=2.5), dict(drift_threshold=float("inf")),
    dict(warn_bytes=-1), dict(warn_bytes=1.5),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="got"):
        TemporalReuseConfig(**kwargs)


def test_config_defaults_and_keyword_only():
    cfg = TemporalReuseConfig()
    assert (cfg.refresh_period, cfg.retention, cfg.ratio_slope, cfg.clamp_ratio, cfg.store_residual,
            cfg.residual_dtype, cfg.drift_threshold, cfg.warn_bytes) == (5, True, 0.04, False, True, torch.bfloat16,
                                                                          None, 4 * 2**30)
    with pytest.raises(TypeError):
        TemporalReuseConfig(5)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.refresh_period = 2  # frozen


def test_call_argument_validation():
    layout = LAYOUTS["tile_larger_than_frame"]
    qp, kp, vp = _permuted(layout, heads=1, dim=8, seed=31)
    cfg, st_ = TemporalReuseConfig(), TemporalReuseState()
    mask = forced_mask(layout)
    with pytest.raises(ValueError, match="step"):
        _run(qp, kp, vp, layout, -1, st_, cfg, lambda: mask)
    with pytest.raises(ValueError, match="permute"):
        _run(layout.unpermute(qp), kp, vp, layout, 0, st_, cfg, lambda: mask)
    with pytest.raises(ValueError, match="bool"):
        _run(qp, kp, vp, layout, 0, st_, cfg, lambda: mask.float())
    with pytest.raises(ValueError, match="TemporalReuseState"):
        _run(qp, kp, vp, layout, 0, {}, cfg, lambda: mask)


# ---------------------------------------------------------------------------------------------------- fuzz
@settings(deadline=None, max_examples=12, derandomize=True)
@given(frames=st.integers(1, 3), height=st.integers(1, 6), width=st.integers(1, 6),
       tile=st.sampled_from([(1, 2, 2), (1, 2, 4), (2, 2, 2), (1, 1, 4)]), text=st.integers(0, 6),
       before=st.booleans(), batch=st.integers(1, 2), heads=st.integers(1, 2), density=st.floats(0.0, 1.0),
       slope=st.sampled_from([0.0, 0.04, 0.5]), dt=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_fuzz_cache_and_sparse_step_vs_oracle(frames, height, width, tile, text, before, batch, heads, density,
                                              slope, dt, seed):
    layout = TokenLayout(frames=frames, height=height, width=width, tile=tile, text_tokens=text,
                         text_position="before" if before else "after")
    g = torch.Generator().manual_seed(seed)
    qp, kp, vp = (layout.permute(torch.randn(batch, layout.seq_len, heads, 4, generator=g, dtype=torch.float64) * 2)
                  for _ in range(3))
    mask = _random_mask(layout, batch, heads, density, seed)
    rho_ref, res_ref, full_ref, sparse_ref = retention_terms_reference(qp, kp, vp, mask, layout)
    cfg = TemporalReuseConfig(ratio_slope=slope, refresh_period=dt + 1, **F64)
    state = TemporalReuseState()
    out0 = _run(qp, kp, vp, layout, 0, state, cfg, lambda: mask)
    torch.testing.assert_close(out0, full_ref, rtol=1e-9, atol=1e-9)
    # rho = exp(LSE_s - LSE_f) from float32 LSEs: each rounds by 2^-24 |LSE|, so the relative error is about
    # 2^-24 (|LSE_s| + |LSE_f|) plus exp's own rounding
    lse_mag = float(torch.logsumexp((qp.transpose(1, 2) @ kp.transpose(1, 2).transpose(-1, -2)).abs() * 0.5,
                                    -1).max())
    torch.testing.assert_close(state.rho.double(), rho_ref, rtol=2**-24 * (2 * lse_mag + 4), atol=1e-7)
    torch.testing.assert_close(state.residual, res_ref, rtol=1e-5, atol=1e-5)
    out = _run(qp, kp, vp, layout, dt, state, cfg, lambda: mask)
    expected = (rho_ref + slope * dt).transpose(1, 2).unsqueeze(-1) * sparse_ref + res_ref
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert state.num_builds == 1
