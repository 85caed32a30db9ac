"""Neighborhood attention (docs/neighborhood.md): tile windows (STA / GNA) and token windows (NATTEN).

Selection sets are compared exactly with brute-force oracles (``dit_sparse.reference.neighborhood``); numeric
outputs with the float64 oracles. Everything runs on the torch backend on small odd grids.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dit_sparse import SparsePlan, TokenLayout, block_sparse_attention
from dit_sparse.methods.base import plan_from_mask
from dit_sparse.methods.neighborhood import (
    NeighborhoodConfig,
    neighborhood_attention,
    neighborhood_attention_exact,
    neighborhood_mask,
    neighborhood_plan,
    neighborhood_token_mask,
)
from dit_sparse.reference.neighborhood import (
    block_box_mask_reference,
    masked_attention_reference,
    natten_axis_allowed,
    natten_token_mask_reference,
    neighborhood_token_mask_reference,
    tile_window_mask_reference,
)
from tests.utils import TOLERANCES, rel_error, structured_qkv

LAYOUTS = {
    "5x7x9": TokenLayout(frames=5, height=7, width=9, tile=(2, 4, 4), packing="tiled"),
    "6x8x16": TokenLayout(frames=6, height=8, width=16, tile=(2, 4, 4), packing="tiled"),
    "5x7x9+text_after": TokenLayout(frames=5, height=7, width=9, tile=(2, 4, 4), packing="tiled", text_tokens=7),
    "5x7x9+text_before": TokenLayout(frames=5, height=7, width=9, tile=(2, 4, 4), packing="tiled", text_tokens=40,
                                     text_position="before"),
    "image_1x7x9": TokenLayout(frames=1, height=7, width=9, tile=(1, 4, 8), packing="tiled"),
    "tiny_2x3x3+text": TokenLayout(frames=2, height=3, width=3, tile=(2, 4, 4), packing="tiled", text_tokens=3),
    "one_token": TokenLayout(frames=1, height=1, width=1, tile=(1, 2, 2), packing="tiled"),
}
SMALL = ["5x7x9+text_after", "5x7x9+text_before", "image_1x7x9", "tiny_2x3x3+text"]


def _slot_mask(layout: TokenLayout, model_mask: torch.Tensor) -> torch.Tensor:
    """Model-order element mask ``[..., S, S]`` -> permuted slot order ``[..., P, P]`` (padding off)."""
    perm = layout.indices().perm
    real = perm >= 0
    p = perm.clamp(min=0)
    out = model_mask[..., p, :][..., :, p]
    return out & real.view(-1, 1) & real.view(1, -1)


def _pool(layout: TokenLayout, slot_mask: torch.Tensor) -> torch.Tensor:
    """Slot-order element mask ``[..., P, P]`` -> block mask ``[..., N, N]``: on iff any pair in the block."""
    n, bs = layout.num_blocks, layout.block_size
    return slot_mask.reshape(*slot_mask.shape[:-2], n, bs, n, bs).any(-1).any(-2)


def _block_expand_model(layout: TokenLayout, block_mask: torch.Tensor) -> torch.Tensor:
    """Block mask ``[..., N, N]`` -> model-order element mask ``[..., S, S]`` (the token set a plan reads)."""
    blk = layout.indices().inverse // layout.block_size
    return block_mask[..., blk, :][..., :, blk]


def _forced_ok(layout: TokenLayout, mask: torch.Tensor) -> bool:
    nv = layout.num_video_blocks
    return bool(mask[..., :, nv:].all() and mask[..., nv:, :].all())


# ---------------------------------------------------------------------------------------------- (a) tile rule
@pytest.mark.parametrize("window", [(3, 3, 3), (1, 3, 5), (5, 5, 5), (3, 1, 1), (1, 1, 1)])
@pytest.mark.parametrize("name", ["5x7x9", "6x8x16", "5x7x9+text_before", "image_1x7x9", "tiny_2x3x3+text",
                                  "one_token"])
def test_tile_plan_csr_equals_bruteforce_tile_rule(name, window):
    layout = LAYOUTS[name]
    cfg = NeighborhoodConfig(window=window)
    plan = neighborhood_plan(layout, cfg).validate()
    dense = plan.to_dense()
    assert dense.shape == (1, 1, layout.num_blocks, layout.num_blocks)
    nv = layout.num_video_blocks
    expected = tile_window_mask_reference(layout.tiles_per_axis, window)
    assert torch.equal(dense[0, 0, :nv, :nv], expected)
    assert _forced_ok(layout, dense)
    assert torch.equal(neighborhood_mask(layout, cfg), dense)
    # tile windows are block-exact: the element mask is the block mask expanded to the tokens
    ref = neighborhood_token_mask_reference(layout, cfg)
    assert torch.equal(_block_expand_model(layout, dense[0, 0]), ref)


# ---------------------------------------------------------------------------------------------- (b) STA == GNA
@pytest.mark.parametrize("window", [(1, 1, 3), (3, 1, 3), (3, 3, 3), (1, 3, 1), (5, 3, 1), (3, 5, 7)])
def test_tile_windows_equal_natten_stride_tile_on_tile_multiples(window):
    layout = LAYOUTS["6x8x16"]  # every axis a tile multiple: 3 x 2 x 4 tiles of 2 x 4 x 4
    plan = neighborhood_plan(layout, NeighborhoodConfig(window=window))
    tokens = _block_expand_model(layout, plan.to_dense()[0, 0])
    kernel = tuple(w * t for w, t in zip(window, layout.tile))
    natten = natten_token_mask_reference(layout.grid, kernel, stride=layout.tile)
    assert torch.equal(tokens, natten)
    # and the same NATTEN window given in tokens is block-exact: the token mode plan equals the tile plan
    token_cfg = NeighborhoodConfig(kernel_size=kernel, stride=layout.tile)
    assert torch.equal(neighborhood_plan(layout, token_cfg).to_dense(), plan.to_dense())


def test_tile_windows_differ_from_natten_at_ragged_edges():
    """Documented deviation: on partial edge tiles the tile window is not the token-exact NATTEN window."""
    layout = LAYOUTS["5x7x9"]
    window = (1, 1, 1)
    plan = neighborhood_plan(layout, NeighborhoodConfig(window=window))
    tokens = _block_expand_model(layout, plan.to_dense()[0, 0])
    kernel = tuple(min(w * t, g) for w, t, g in zip(window, layout.tile, layout.grid))
    natten = natten_token_mask_reference(layout.grid, kernel, stride=layout.tile)
    assert not torch.equal(tokens, natten)


# ---------------------------------------------------------------------------------------------- (c) token rule
def test_axis_rule_matches_natten_examples():
    """Hand-checked token-window cases (docs/neighborhood.md#token-windows): border clamping, stride leaders,
    dilation groups, causal."""
    row = lambda x, L, k, s=1, d=1, c=False: [j for j in range(L) if natten_axis_allowed(x, j, L, k, s, d, c)]
    assert row(0, 7, 3) == [0, 1, 2]  # clamped inward: still k keys
    assert row(3, 7, 3) == [2, 3, 4]
    assert row(6, 7, 3) == [4, 5, 6]
    assert row(1, 8, 4, 4) == [0, 1, 2, 3] and row(5, 8, 4, 4) == [4, 5, 6, 7]  # s = k: blocked windows
    assert row(2, 8, 3, 1, 2) == [0, 2, 4]  # dilation 2: own group only
    assert row(4, 7, 3, 1, 1, True) == [2, 3, 4]  # causal
    assert row(4, 7, 3, 2, 1, True) == [3, 4]  # causal with stride: leader 5, keys <= 4 and 5 - j < 3
    assert row(0, 3, 5) == [0, 1, 2]  # kernel longer than the axis: the whole axis


def test_vectorised_axis_rule_exhaustive():
    """The per-axis table behind every token mask equals the pair-by-pair oracle on all small cases."""
    from dit_sparse.methods.neighborhood import _token_axis

    for length in range(1, 9):
        for kernel in range(1, 6):
            for stride in range(1, kernel + 1):
                for dilation in range(1, 4):
                    for causal in (False, True):
                        got = _token_axis(length, kernel, stride, dilation, causal, "cpu")
                        ref = torch.tensor([[natten_axis_allowed(x, j, length, kernel, stride, dilation, causal)
                                             for j in range(length)] for x in range(length)])
                        assert torch.equal(got, ref), (length, kernel, stride, dilation, causal)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 7)),
       tile=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
       kernel=st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5)),
       stride_frac=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)),
       causal=st.booleans(), text=st.integers(0, 5), before=st.booleans())
def test_token_mode_mask_and_plan_match_bruteforce(grid, tile, kernel, stride_frac, dilation, causal, text, before):
    stride = tuple(max(1, round(f * k)) for f, k in zip(stride_frac, kernel))
    cfg = NeighborhoodConfig(kernel_size=kernel, stride=stride, dilation=dilation, causal=causal, exact=True)
    for packing in ("tiled", "packed"):
        layout = TokenLayout(frames=grid[0], height=grid[1], width=grid[2], tile=tile, text_tokens=text,
                             text_position="before" if before else "after", packing=packing)
        ref_model = neighborhood_token_mask_reference(layout, cfg)
        ref_slots = _slot_mask(layout, ref_model)
        got = neighborhood_token_mask(layout, cfg)
        assert torch.equal(got, ref_slots)
        blocks = neighborhood_plan(layout, cfg).validate().to_dense()[0, 0]
        _check_block_plan(layout, cfg, blocks[None], ref_slots)
        assert bool((_block_expand_model(layout, blocks) | ~ref_model).all())


def _check_block_plan(layout: TokenLayout, cfg: NeighborhoodConfig, blocks: torch.Tensor,
                      ref_slots: torch.Tensor) -> None:
    """``blocks [Hw, N, N]``: the bounding-box oracle exactly; a superset of the blocks the token mask touches,
    equal to them on pairs of blocks that are tiles (tiled layouts: everywhere)."""
    nv = layout.num_video_blocks
    assert torch.equal(blocks[:, :nv, :nv], block_box_mask_reference(layout, cfg))
    touched = _pool(layout, ref_slots if ref_slots.dim() == 3 else ref_slots[None])
    assert bool((blocks | ~touched).all())  # superset
    tiles = layout.block_is_tile()
    pair = torch.zeros(layout.num_blocks, layout.num_blocks, dtype=torch.bool)
    pair[:nv, :nv] = tiles.view(-1, 1) & tiles.view(1, -1)
    pair[nv:, :] = pair[:, nv:] = True  # text rows and columns: exact too
    assert torch.equal(blocks[:, pair], touched[:, pair])
    if layout.packing == "tiled":
        assert torch.equal(blocks, touched)


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("cfg", [
    NeighborhoodConfig(kernel_size=(3, 3, 5), stride=(1, 2, 2), dilation=(1, 1, 2), exact=True),
    NeighborhoodConfig(kernel_size=(2, 5, 3), causal=True, exact=True),
    NeighborhoodConfig(window=(1, 3, 1)),
], ids=["gna_dilated", "causal", "tile"])
def test_exact_path_matches_masked_reference(name, cfg):
    layout = LAYOUTS[name]
    q, k, v = structured_qkv(layout, batch=2, heads=2, dim=16, seed=1)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    out, lse = neighborhood_attention_exact(qp, kp, vp, layout, cfg, return_lse=True)
    ref, ref_lse = masked_attention_reference(q, k, v, neighborhood_token_mask_reference(layout, cfg))
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(layout.unpermute(out), ref, atol=atol, rtol=rtol)
    inv = layout.indices().inverse
    torch.testing.assert_close(lse[:, :, inv], ref_lse, atol=atol, rtol=rtol)
    real = layout.indices().perm >= 0
    assert bool((out[:, ~real] == 0).all()) and bool(torch.isinf(lse[:, :, ~real]).all())  # padding rows
    if name == "5x7x9+text_before":  # float32 inputs run in float32
        out32 = neighborhood_attention_exact(*(t.float() for t in (qp, kp, vp)), layout, cfg)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(layout.unpermute(out32).double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", SMALL)
def test_tile_mode_block_plan_is_exact(name):
    """Block-sparse attention on the tile plan == dense attention under the token-level tile window."""
    layout = LAYOUTS[name]
    cfg = NeighborhoodConfig(window=(1, 3, 1))
    q, k, v = structured_qkv(layout, heads=2, dim=16, seed=2)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    out = layout.unpermute(neighborhood_attention(qp, kp, vp, layout, cfg, backend="torch"))
    ref, _ = masked_attention_reference(q, k, v, neighborhood_token_mask_reference(layout, cfg))
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_block_rounded_token_plan_is_superset_not_exact():
    """exact=False runs the block-rounded plan: every query reads its window and more, so outputs differ."""
    layout = LAYOUTS["5x7x9+text_after"]
    cfg = NeighborhoodConfig(kernel_size=(3, 3, 3))
    q, k, v = structured_qkv(layout, heads=2, dim=16, seed=3)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    rounded = neighborhood_attention(qp, kp, vp, layout, cfg, backend="torch")
    exact = neighborhood_attention(qp, kp, vp, layout, dataclasses.replace(cfg, exact=True))
    assert rel_error(layout.unpermute(rounded), layout.unpermute(exact)) > 1e-3
    ref_plan = plan_from_mask(_pool(layout, neighborhood_token_mask(layout, cfg)), layout)
    torch.testing.assert_close(rounded, block_sparse_attention(qp, kp, vp, ref_plan, backend="torch"))


# ---------------------------------------------------------------------------------------------- (d) full window
@pytest.mark.parametrize("name", ["5x7x9+text_after", "5x7x9+text_before", "image_1x7x9"])
def test_full_window_equals_dense(name):
    layout = LAYOUTS[name]
    q, k, v = structured_qkv(layout, heads=2, dim=16, seed=4)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    dense = dense.transpose(1, 2)
    atol, rtol = TOLERANCES[torch.float64]
    for cfg in (NeighborhoodConfig(window=(3, 3, 3)), NeighborhoodConfig(window=(9, 9, 9)),
                NeighborhoodConfig(kernel_size=(5, 7, 9), exact=True), NeighborhoodConfig(kernel_size=(9, 9, 11))):
        plan = neighborhood_plan(layout, cfg)
        assert plan.is_dense and plan.density == pytest.approx(1.0)
        out = layout.unpermute(neighborhood_attention(qp, kp, vp, layout, cfg, backend="torch"))
        torch.testing.assert_close(out, dense, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- (e) NATTEN
@pytest.mark.skipif(importlib.util.find_spec("natten") is None,
                    reason="natten not installed (optional oracle): "
                           "pip install --no-build-isolation --no-deps natten==0.21.7")
@pytest.mark.parametrize("kw", [dict(kernel_size=(3, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2)),
                                dict(kernel_size=(2, 5, 3), stride=(2, 1, 3), is_causal=(True, False, False))])
def test_exact_path_matches_natten(kw):
    import natten

    layout = TokenLayout(frames=4, height=6, width=8, tile=(2, 4, 4), text_tokens=5)
    cfg = NeighborhoodConfig(kernel_size=kw["kernel_size"], stride=kw["stride"], dilation=kw.get("dilation", 1),
                             causal=kw.get("is_causal", (False,))[0], exact=True)
    q, k, v = structured_qkv(layout, heads=2, dim=16, seed=5, dtype=torch.float32)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    out = layout.unpermute(neighborhood_attention(qp, kp, vp, layout, cfg))[:, : layout.num_video_tokens]
    shape = (1, *layout.grid, 2, 16)
    nvt = layout.num_video_tokens
    ref = natten.na3d(q[:, :nvt].reshape(shape), k[:, :nvt].reshape(shape), v[:, :nvt].reshape(shape),
                      additional_keys=k[:, nvt:], additional_values=v[:, nvt:], backend="flex-fna", **kw)
    torch.testing.assert_close(out, ref.reshape(1, nvt, 2, 16), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- (g) density
def test_density_reported_is_product_of_window_fractions():
    layout = LAYOUTS["6x8x16"]  # 3 x 2 x 4 tiles, no padding, no text
    for window in ((1, 1, 1), (1, 1, 3), (3, 1, 3), (1, 3, 5)):
        cfg = NeighborhoodConfig(window=window)
        nominal = math.prod(min(w, n) / n for w, n in zip(window, layout.tiles_per_axis))
        assert cfg.nominal_density(layout) == pytest.approx(nominal)
        assert neighborhood_plan(layout, cfg).density == pytest.approx(nominal, rel=1e-6)
    per_head = NeighborhoodConfig(window=((1, 1, 1), (1, 1, 3)))
    assert neighborhood_plan(layout, per_head).density == pytest.approx((1 / 24 + 3 / 24) / 2, rel=1e-6)
    # ragged grid: the achieved density (real tokens) stays close to the nominal one
    for packing in ("tiled", "packed"):
        ragged = TokenLayout(frames=9, height=15, width=31, tile=(2, 4, 4), packing=packing)
        cfg = NeighborhoodConfig(window=(3, 3, 3))
        got, nominal = neighborhood_plan(ragged, cfg).density, cfg.nominal_density(ragged)
        print(f"ragged 9x15x31 tile (2,4,4) {packing}, window 3x3x3: density {got:.4f}, nominal {nominal:.4f}")
        # packed edge blocks round up: at most their rows and columns come on in addition
        packed_share = 2 * ragged.num_packed_blocks / ragged.num_video_blocks if packing == "packed" else 0.0
        assert abs(got - nominal) < 0.25 * nominal + packed_share


# ---------------------------------------------------------------------------------------------- packed layouts
PACKED = {
    "5x7x9+text_after": TokenLayout(frames=5, height=7, width=9, tile=(2, 4, 4), text_tokens=7),
    "5x6x11+text_before": TokenLayout(frames=5, height=6, width=11, tile=(1, 4, 4), text_tokens=20,
                                      text_position="before"),
    "image_1x7x9": TokenLayout(frames=1, height=7, width=9, tile=(1, 4, 8)),
}


@pytest.mark.parametrize("name", list(PACKED))
@pytest.mark.parametrize("cfg", [NeighborhoodConfig(window=(1, 3, 1)), NeighborhoodConfig(window=(3, 1, 3)),
                                 NeighborhoodConfig(window=((1, 1, 1), (3, 3, 3))),
                                 NeighborhoodConfig(kernel_size=(3, 3, 5), stride=(1, 2, 2))],
                         ids=["tile131", "tile313", "per_head", "token"])
def test_packed_plan_is_box_superset_exact_on_tiles(name, cfg):
    """Packed edge blocks: the plan follows the bounding boxes (oracle), covers every allowed token pair, and is
    exact on pairs of blocks that are tiles; exact=True gives the token-exact attention."""
    layout = PACKED[name]
    assert layout.num_packed_blocks > 0
    blocks = neighborhood_mask(layout, cfg)[0]
    ref_model = neighborhood_token_mask_reference(layout, cfg)
    ref_slots = _slot_mask(layout, ref_model)
    assert torch.equal(neighborhood_token_mask(layout, cfg), ref_slots)
    _check_block_plan(layout, cfg, blocks, ref_slots)
    q, k, v = structured_qkv(layout, batch=1, heads=cfg.num_heads, dim=16, seed=4)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    exact = layout.unpermute(neighborhood_attention(qp, kp, vp, layout, dataclasses.replace(cfg, exact=True)))
    ref, _ = masked_attention_reference(q, k, v, ref_model)
    atol, rtol = TOLERANCES[torch.float64]
    torch.testing.assert_close(exact, ref, atol=atol, rtol=rtol)


def test_packed_tile_window_rounds_up_only_on_packed_blocks():
    """The documented deviation: with packed edge blocks the tile plan is a strict superset of the window."""
    layout = PACKED["5x7x9+text_after"]
    cfg = NeighborhoodConfig(window=(1, 3, 1))
    blocks = neighborhood_mask(layout, cfg)[0, 0]
    touched = _pool(layout, _slot_mask(layout, neighborhood_token_mask_reference(layout, cfg)))
    extra = blocks & ~touched
    assert bool(extra.any())
    tiles = layout.block_is_tile()
    nv = layout.num_video_blocks
    assert not bool(extra[:nv, :nv][tiles][:, tiles].any())  # only pairs with a packed block


# ---------------------------------------------------------------------------------------------- per head
def test_per_head_windows():
    layout = LAYOUTS["5x7x9+text_after"]
    windows = ((1, 1, 1), (3, 3, 3), (1, 3, 1))
    cfg = NeighborhoodConfig(window=windows)
    mask = neighborhood_mask(layout, cfg)
    assert mask.shape == (1, 3, layout.num_blocks, layout.num_blocks)
    for h, w in enumerate(windows):
        assert torch.equal(mask[0, h], neighborhood_mask(layout, NeighborhoodConfig(window=w))[0, 0])
    tm = neighborhood_token_mask(layout, cfg)
    assert tm.shape == (3, layout.padded_len, layout.padded_len)
    q, k, v = structured_qkv(layout, batch=2, heads=3, dim=16, seed=6)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    out = layout.unpermute(neighborhood_attention(qp, kp, vp, layout, cfg, backend="torch"))
    exact = layout.unpermute(neighborhood_attention_exact(qp, kp, vp, layout, cfg))
    torch.testing.assert_close(out, exact, atol=1e-10, rtol=1e-10)
    for h, w in enumerate(windows):
        single = layout.unpermute(neighborhood_attention(qp[:, :, h:h + 1], kp[:, :, h:h + 1], vp[:, :, h:h + 1],
                                                         layout, NeighborhoodConfig(window=w), backend="torch"))
        torch.testing.assert_close(out[:, :, h:h + 1], single, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="per-head windows"):
        neighborhood_attention_exact(qp[:, :, :2], kp[:, :, :2], vp[:, :, :2], layout, cfg)


# ---------------------------------------------------------------------------------------------- (h) fidelity
def test_structured_fidelity_local_regime_beats_random_blocks_at_same_density():
    """Where attention is local (sharpness 12: most of the softmax mass sits within a few tokens), a 0.3-density
    window beats random blocks of the same density. With the fixture's default sharpness (6) about half of the
    mass is spread over the whole grid and random blocks win (measured 0.117 vs 0.107-0.112): neighborhood
    attention alone is for local heads."""
    layout = TokenLayout(frames=4, height=20, width=20, tile=(2, 4, 4))  # 2 x 5 x 5 tiles
    cfg = NeighborhoodConfig(window=(1, 5, 3))
    plan = neighborhood_plan(layout, cfg)
    q, k, v = structured_qkv(layout, heads=2, dim=32, seed=7, sharpness=12.0)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    dense = dense.transpose(1, 2)
    err = rel_error(layout.unpermute(block_sparse_attention(qp, kp, vp, plan, backend="torch")), dense)
    nv = layout.num_video_blocks
    per_row = int(plan.kv_num_blocks[0, 0, 0])
    gen = torch.Generator().manual_seed(0)
    rand_errs = []
    for _ in range(3):  # random blocks, same count per row, diagonal kept (the fairest random baseline)
        scores = torch.rand(1, 2, nv, nv, generator=gen)
        scores[..., torch.arange(nv), torch.arange(nv)] = 2.0
        mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(per_row, -1).indices, True)
        rplan = plan_from_mask(mask, layout)
        rand_errs.append(rel_error(layout.unpermute(block_sparse_attention(qp, kp, vp, rplan, backend="torch")),
                                   dense))
    print(f"density {plan.density:.3f}: neighborhood rel err {err:.4f}, random blocks {rand_errs}")
    assert plan.density == pytest.approx(0.3, abs=0.01)
    assert err < min(rand_errs)


# ---------------------------------------------------------------------------------------------- API
def test_config_validation():
    assert NeighborhoodConfig().window == (3, 3, 3) and NeighborhoodConfig().mode == "tile"
    assert NeighborhoodConfig(window=5).window == (5, 5, 5)
    assert NeighborhoodConfig(kernel_size=3).kernel_size == (3, 3, 3)
    assert NeighborhoodConfig(kernel_size=(3, 5, 5), stride=2).stride == (2, 2, 2)
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodConfig(window=(3, 2, 3))
    with pytest.raises(ValueError, match="got both"):
        NeighborhoodConfig(window=(3, 3, 3), kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="stride <= kernel_size"):
        NeighborhoodConfig(kernel_size=(3, 3, 3), stride=(1, 4, 1))
    assert NeighborhoodConfig(window=(3, 3, 3), exact=True).exact  # tile windows: exact on packed edge blocks
    with pytest.raises(ValueError, match="token windows"):
        NeighborhoodConfig(window=(3, 3, 3), causal=True)
    with pytest.raises(ValueError, match="three ints"):
        NeighborhoodConfig(kernel_size=(3, 3))
    with pytest.raises(ValueError, match=">= 1"):
        NeighborhoodConfig(kernel_size=(3, 3, 3), dilation=0)
    with pytest.raises(TypeError):
        NeighborhoodConfig((3, 3, 3))  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        NeighborhoodConfig().exact = True


def test_caching_and_dispatch():
    layout = LAYOUTS["5x7x9+text_after"]
    cfg = NeighborhoodConfig(window=(1, 1, 1))
    assert neighborhood_plan(layout, cfg) is neighborhood_plan(layout, NeighborhoodConfig(window=(1, 1, 1)))
    m = neighborhood_mask(layout, cfg)
    m.fill_(True)  # a returned mask is a copy: the cache is untouched
    assert not bool(neighborhood_mask(layout, cfg).all())
    assert isinstance(neighborhood_plan(layout, cfg), SparsePlan)
    qp = torch.zeros(1, layout.padded_len, 1, 8)
    with pytest.raises(NotImplementedError, match="torch path only"):
        neighborhood_attention(qp, qp, qp, layout, NeighborhoodConfig(kernel_size=3, exact=True), backend="triton")
    with pytest.raises(ValueError, match="permute"):
        neighborhood_attention_exact(qp[:, :-1], qp, qp, layout, cfg)
