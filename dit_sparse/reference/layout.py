"""Brute-force token layout (test oracle; loops, small grids only): which model-order tokens each block holds.

Written from docs/layout.md#packings and the packing rule of :mod:`dit_sparse.layout`, one token at a time, without
the vectorised index code it checks:

* ``"tiled"``: tile after tile in raster tile order, one block each; inside a tile the real tokens in raster order.
* ``"packed"``: the complete tiles first (raster tile order, one block each); then the partial edge tiles, slab
  (temporal tile index) after slab; inside a slab down the right edge column (when the width is not a tile
  multiple), then right to left along the bottom edge row, and a slab made only of partial tiles (the time edge)
  in boustrophedon raster order (rows down, columns alternating left-right / right-left); every odd slab in
  reverse. Their real tokens, tile after tile, fill blocks of ``block_size``; only the last one is partial.
* Text: after the video blocks in chunks of ``block_size``, whatever the model's order.
"""

from __future__ import annotations

__all__ = ["block_members_reference", "perm_reference", "block_bbox_reference"]


def _tiles(layout):
    (T, Hg, Wg), (tt, th, tw) = layout.grid, layout.tile
    nt, nh, nw = -(-T // tt), -(-Hg // th), -(-Wg // tw)
    voff = layout.text_tokens if layout.text_position == "before" else 0
    tiles = {}
    for a in range(nt):
        for b in range(nh):
            for c in range(nw):
                toks = []
                for dt in range(tt):
                    for dy in range(th):
                        for dx in range(tw):
                            f, y, x = a * tt + dt, b * th + dy, c * tw + dx
                            if f < T and y < Hg and x < Wg:
                                toks.append(voff + f * Hg * Wg + y * Wg + x)
                tiles[(a, b, c)] = toks
    return tiles, (nt, nh, nw)


def _edge_key(layout, a: int, b: int, c: int, n: tuple[int, int, int]) -> tuple[int, int]:
    (T, _, Wg), (tt, _, tw) = layout.grid, layout.tile
    nt, nh, nw = n
    if a == nt - 1 and T % tt:  # a slab of partial tiles only
        pos = b * nw + (c if b % 2 == 0 else nw - 1 - c)
    elif Wg % tw and c == nw - 1:  # right edge column, top to bottom
        pos = b
    else:  # bottom edge row, right to left
        pos = nh + (nw - 1 - c)
    return (a, -pos if a % 2 else pos)


def block_members_reference(layout) -> list[list[int]]:
    """Model-order token indices of every block (video blocks, then text chunks), by loops."""
    tiles, n = _tiles(layout)
    bs = layout.block_size
    if layout.packing == "tiled":
        video = [tiles[key] for key in sorted(tiles)]
    else:
        video = [tiles[key] for key in sorted(tiles) if len(tiles[key]) == bs]
        partial = sorted((key for key in tiles if len(tiles[key]) < bs), key=lambda k: _edge_key(layout, *k, n))
        rest = [t for key in partial for t in tiles[key]]
        video += [rest[i:i + bs] for i in range(0, len(rest), bs)]
    T, Hg, Wg = layout.grid
    toff = 0 if layout.text_position == "before" else T * Hg * Wg
    text = [[toff + t for t in range(s, min(s + bs, layout.text_tokens))] for s in range(0, layout.text_tokens, bs)]
    return video + text


def perm_reference(layout) -> list[int]:
    """Model-order index of every slot of the permuted sequence, ``-1`` for padding."""
    bs = layout.block_size
    return [m for blk in block_members_reference(layout) for m in blk + [-1] * (bs - len(blk))]


def block_bbox_reference(layout) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """Inclusive ``((f0, y0, x0), (f1, y1, x1))`` box of every video block's tokens."""
    T, Hg, Wg = layout.grid
    voff = layout.text_tokens if layout.text_position == "before" else 0
    n_text = -(-layout.text_tokens // layout.block_size)
    members = block_members_reference(layout)
    boxes = []
    for blk in members[: len(members) - n_text]:
        pts = [((i - voff) // (Hg * Wg), (i - voff) // Wg % Hg, (i - voff) % Wg) for i in blk]
        lo = tuple(min(p[a] for p in pts) for a in range(3))
        boxes.append((lo, tuple(max(p[a] for p in pts) for a in range(3))))
    return boxes
