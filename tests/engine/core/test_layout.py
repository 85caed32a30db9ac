"""TokenLayout: exact permutation round trips on awkward grids, valid-first tiles, Draft's closed form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import TokenLayout, pick_tile
from dit_sparse.reference.layout import block_bbox_reference, perm_reference

AWKWARD = [(21, 30, 52), (13, 30, 45), (1, 64, 64), (5, 7, 9)]


def brute_force_perm(layout: TokenLayout) -> list[int]:
    """The tiled packing of docs/layout.md#packings, with loops: model-order index of every slot (-1 = padding)."""
    T, Hg, Wg = layout.grid
    tt, th, tw = layout.tile
    nt, nh, nw = layout.tiles_per_axis
    bs = layout.block_size
    voff = layout.text_tokens if layout.text_position == "before" else 0
    toff = 0 if layout.text_position == "before" else T * Hg * Wg
    perm = [-1] * (nt * nh * nw * bs)
    for a in range(nt):
        for b in range(nh):
            for c in range(nw):
                slot = ((a * nh + b) * nw + c) * bs
                for dt in range(tt):
                    for dy in range(th):
                        for dx in range(tw):
                            f, y, x = a * tt + dt, b * th + dy, c * tw + dx
                            if f < T and y < Hg and x < Wg:
                                perm[slot] = voff + f * Hg * Wg + y * Wg + x
                                slot += 1
    text = [toff + i for i in range(layout.text_tokens)]
    text += [-1] * (layout.num_text_blocks * bs - len(text))
    return perm + text


@pytest.mark.parametrize("grid", AWKWARD, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("text", [(0, "after"), (77, "after"), (226, "before")], ids=lambda t: f"text{t[0]}{t[1]}")
def test_round_trip_exact(grid, text):
    layout = TokenLayout(frames=grid[0], height=grid[1], width=grid[2], text_tokens=text[0], text_position=text[1])
    x = torch.randn(2, layout.seq_len, 3, 5)
    xp = layout.permute(x)
    assert xp.shape == (2, layout.padded_len, 3, 5)
    assert torch.equal(layout.unpermute(xp), x)
    # padding slots are zero, real slots hold their tokens
    perm = layout.indices().perm
    assert torch.equal(xp[:, perm < 0], torch.zeros_like(xp[:, perm < 0]))
    assert torch.equal(xp[:, perm >= 0], x[:, perm[perm >= 0]])
    # (B, S, C) tensors too
    y = torch.randn(1, layout.seq_len, 7)
    assert torch.equal(layout.unpermute(layout.permute(y)), y)


@pytest.mark.parametrize("grid,tile", [((5, 7, 9), (2, 4, 4)), ((3, 10, 13), (1, 4, 8)), ((21, 30, 52), (1, 16, 8))])
@pytest.mark.parametrize("text", [(0, "after"), (19, "after"), (40, "before")])
def test_permutation_matches_brute_force(grid, tile, text):
    tiled = TokenLayout(frames=grid[0], height=grid[1], width=grid[2], tile=tile, text_tokens=text[0],
                        text_position=text[1], packing="tiled")
    assert tiled.indices().perm.tolist() == brute_force_perm(tiled) == perm_reference(tiled)
    packed = TokenLayout(frames=grid[0], height=grid[1], width=grid[2], tile=tile, text_tokens=text[0],
                         text_position=text[1])
    assert packed.packing == "packed"
    assert packed.indices().perm.tolist() == perm_reference(packed)


@pytest.mark.parametrize("packing", ["packed", "tiled"])
def test_valid_first_counts(packing):
    layout = TokenLayout(frames=5, height=7, width=9, tile=(2, 4, 4), text_tokens=40, packing=packing)
    valid = layout.block_valid()
    perm = layout.indices().perm.view(layout.num_blocks, layout.block_size)
    real = perm >= 0
    assert torch.equal(real.sum(1).to(torch.int32), valid)
    # valid-first: real slots are a prefix of every block
    assert torch.equal(real, torch.arange(layout.block_size) < valid.view(-1, 1))
    assert int(valid.sum()) == layout.seq_len
    assert valid[-1] == 40 % 32 or valid[-1] == 32
    nv = layout.num_video_blocks
    if packing == "packed":  # only the last video block is partial; video padding below one block
        assert bool((valid[: nv - 1] == layout.block_size).all()) and nv == -(-layout.num_video_tokens // 32)


def test_draft_closed_form():
    """docs/layout.md#draftattention-reorder: with tile (1, h, w) dividing the grid,
    slot = f*Hg*Wg + (i*(Wg/w) + j)*(h*w) + u*w + v."""
    T, Hg, Wg, h, w = 3, 16, 32, 8, 16
    layout = TokenLayout(frames=T, height=Hg, width=Wg, tile=(1, h, w))
    x = torch.arange(T * Hg * Wg).view(1, -1, 1)
    xp = layout.permute(x).view(-1)
    for f in range(T):
        for i in range(Hg // h):
            for j in range(Wg // w):
                for u in range(h):
                    for v in range(w):
                        orig = f * Hg * Wg + (i * h + u) * Wg + (j * w + v)
                        new = f * Hg * Wg + (i * (Wg // w) + j) * (h * w) + u * w + v
                        assert xp[new] == orig


def test_tile_picker():
    # Wan2.1 480p: the picker beats Draft's (1, 8, 16) rule (24% padding)
    tile = pick_tile(21, 30, 52)
    layout = TokenLayout(frames=21, height=30, width=52)
    assert layout.tile == tile and layout.block_size == 128
    assert layout.padding_fraction < 1 - 32760 / (21 * 32 * 64)
    assert pick_tile(1, 64, 64)[0] == 1  # images never tile time
    assert TokenLayout(frames=2, height=4, width=4, block_size=64).block_size == 64


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), Hg=st.integers(1, 20), Wg=st.integers(1, 20), text=st.integers(0, 50),
       before=st.booleans(), tile=st.sampled_from([(1, 4, 4), (2, 4, 2), (1, 8, 16), (2, 2, 8), (1, 1, 16)]))
def test_round_trip_fuzz(T, Hg, Wg, text, before, tile):
    for packing in ("packed", "tiled"):
        layout = TokenLayout(frames=T, height=Hg, width=Wg, text_tokens=text,
                             text_position="before" if before else "after", tile=tile, packing=packing)
        x = torch.randn(1, layout.seq_len, 2)
        assert torch.equal(layout.unpermute(layout.permute(x)), x)
        assert layout.indices().perm.tolist() == perm_reference(layout)
        if packing == "tiled":
            assert layout.indices().perm.tolist() == brute_force_perm(layout)
        box = [tuple(map(tuple, b)) for b in layout.block_bbox().tolist()]
        assert box == block_bbox_reference(layout)
        assert layout.block_is_tile().tolist() == [
            sorted(m) == sorted(t) for m, t in zip(_video_members(layout), _video_members(layout, tiles=True))]


def _video_members(layout: TokenLayout, tiles: bool = False) -> list[list[int]]:
    """Model-order tokens per video block; ``tiles``: the tile (by coordinates) of each block's first token."""
    perm = layout.indices().perm.view(layout.num_blocks, layout.block_size)[: layout.num_video_blocks].tolist()
    blocks = [[i for i in row if i >= 0] for row in perm]
    if not tiles:
        return blocks
    T, Hg, Wg = layout.grid
    voff = layout.text_tokens if layout.text_position == "before" else 0
    tile_of = lambda i: ((i - voff) // (Hg * Wg) // layout.tile[0], (i - voff) // Wg % Hg // layout.tile[1],
                         (i - voff) % Wg // layout.tile[2])
    every = [i + voff for i in range(T * Hg * Wg)]
    return [[i for i in every if tile_of(i) == tile_of(blk[0])] for blk in blocks]


# every preset's target grid (docs/models.md#grids; text in the self-attention call, block 128)
PRESET_GRIDS = {
    "wan2.1-480p": (21, 30, 52, 0, "after"), "wan2.1/2.2-720p": (21, 45, 80, 0, "after"),
    "hunyuanvideo-720p": (33, 45, 80, 256, "after"), "hunyuanvideo-540p": (33, 34, 60, 256, "after"),
    "cogvideox-2b": (13, 30, 45, 226, "before"), "cogvideox1.5": (11, 48, 80, 226, "before"),
    "ltx-video-704x512x161": (21, 16, 22, 0, "after"), "flux-1024": (1, 64, 64, 512, "before"),
    "sd3-1024": (1, 64, 64, 333, "after"),
}


@pytest.mark.parametrize("name", list(PRESET_GRIDS))
def test_padding_at_most_2_percent_on_preset_grids(name):
    T, Hg, Wg, text, pos = PRESET_GRIDS[name]
    layout = TokenLayout(frames=T, height=Hg, width=Wg, text_tokens=text, text_position=pos)
    assert layout.packing == "packed" and layout.block_size == 128
    slots = layout.padded_len
    assert slots == 128 * (-(-T * Hg * Wg // 128) + -(-text // 128))  # at most one partial block each
    assert 1 - (T * Hg * Wg + text) / slots <= 0.02, layout


def test_indices_cached_per_device():
    layout = TokenLayout(frames=2, height=8, width=8, tile=(1, 4, 8))
    assert layout.indices("cpu") is layout.indices(torch.device("cpu"))
    assert TokenLayout(frames=2, height=8, width=8, tile=(1, 4, 8)).indices() is layout.indices()


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=0, height=4, width=4), "frames"),
    (dict(frames=1, height=4, width=4, text_position="middle"), "text_position"),
    (dict(frames=1, height=4, width=4, text_tokens=-1), "text_tokens"),
    (dict(frames=1, height=4, width=4, tile=(1, 0, 4)), "tile"),
])
def test_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenLayout(**kwargs)


def test_wrong_length_names_fix():
    layout = TokenLayout(frames=2, height=8, width=8)
    with pytest.raises(ValueError, match="build a TokenLayout"):
        layout.permute(torch.randn(1, 100, 2, 4))
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        layout.permute(torch.randn(100, 4))
