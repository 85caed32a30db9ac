"""Brute-force neighborhood-attention references (test oracles; loops, small grids only).

* :func:`natten_axis_allowed`: the per-axis NATTEN / GNA token test of docs/neighborhood.md#token-windows, written
  after the expressions of NATTEN's flex mask (``src/natten/backends/flex.py``), one (query, key) pair at a time.
* :func:`natten_token_mask_reference`: the 3-D token mask, video tokens in raster order.
* :func:`tile_window_mask_reference`: the docs/neighborhood.md#tile-windows tile-window rule, one (query tile, key
  tile) pair at a time.
* :func:`neighborhood_token_mask_reference`: the full element mask in **model order** (video + text).
* :func:`block_box_mask_reference`: the video block mask of any layout (packed edge blocks included): a block
  pair is on iff the window allows some (query, key) pair of coordinates in the two blocks' bounding boxes.
* :func:`masked_attention_reference`: dense float64 softmax attention under an element mask.

An axis shorter than ``kernel * dilation`` (NATTEN raises there) is attended whole inside the dilation group,
the behaviour :class:`dit_sparse.methods.neighborhood.NeighborhoodConfig` documents.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "natten_axis_allowed",
    "natten_token_mask_reference",
    "tile_window_mask_reference",
    "neighborhood_token_mask_reference",
    "block_box_mask_reference",
    "masked_attention_reference",
]


def natten_axis_allowed(x: int, xk: int, length: int, kernel: int, stride: int = 1, dilation: int = 1,
                        causal: bool = False) -> bool:
    """Whether the query at coordinate ``x`` attends the key at ``xk`` on one axis of length ``length``."""
    if x % dilation != xk % dilation:  # 1. dilation groups
        return False
    group = x % dilation
    lg = math.ceil((length - group) / dilation)  # tokens in this dilation group
    q, j = x // dilation, xk // dilation
    if causal:  # 4. leader = last query of the stride group
        leader = min((q // stride) * stride + stride - 1, lg - 1)
        return j <= q and leader - j < kernel
    if kernel >= lg:  # window as large as the group: everything in the group
        return True
    leader = min((q // stride) * stride + stride // 2, lg - 1)  # 2. leader = centre, right-hand for even s
    left = kernel // 2  # 3. non-causal window, clamped inward at the borders
    right = kernel // 2 + (kernel % 2 - 1)
    centre = min(max(leader, left), lg - 1 - right)
    w0, w1 = centre - j, j - centre
    return (0 <= w0 <= left) or (0 <= w1 <= right)


def natten_token_mask_reference(grid: tuple[int, int, int], kernel_size: tuple[int, int, int],
                                stride: tuple[int, int, int] = (1, 1, 1), dilation: tuple[int, int, int] = (1, 1, 1),
                                causal: tuple[bool, bool, bool] = (False, False, False)) -> torch.Tensor:
    """bool ``[Nv, Nv]`` over video tokens in raster order ``f*H*W + y*W + x``: the token-window rule
    (docs/neighborhood.md#token-windows) on every axis."""
    axes = []
    for length, k, s, d, c in zip(grid, kernel_size, stride, dilation, causal):
        t = torch.zeros(length, length, dtype=torch.bool)
        for x in range(length):
            for xk in range(length):
                t[x, xk] = natten_axis_allowed(x, xk, length, k, s, d, c)
        axes.append(t)
    T, Hg, Wg = grid
    m = (axes[0].view(T, 1, 1, T, 1, 1) & axes[1].view(1, Hg, 1, 1, Hg, 1) & axes[2].view(1, 1, Wg, 1, 1, Wg))
    return m.reshape(T * Hg * Wg, T * Hg * Wg)


def tile_window_mask_reference(tiles_per_axis: tuple[int, int, int], window: tuple[int, int, int]) -> torch.Tensor:
    """bool ``[n_b, n_b]`` over tiles in raster order: the tile-window rule (docs/neighborhood.md#tile-windows),
    pair by pair."""
    nt, nh, nw = tiles_per_axis
    coords = [(a, b, c) for a in range(nt) for b in range(nh) for c in range(nw)]
    m = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, g in enumerate(coords):
        starts = [min(max(g[a] - window[a] // 2, 0), max(tiles_per_axis[a] - window[a], 0)) for a in range(3)]
        for j, gk in enumerate(coords):
            m[i, j] = all(starts[a] <= gk[a] < starts[a] + min(window[a], tiles_per_axis[a]) for a in range(3))
    return m


def neighborhood_token_mask_reference(layout, config) -> torch.Tensor:
    """bool ``[S, S]`` (``[H, S, S]`` for per-head tile windows) in **model order**, text included.

    Video query x video key follows the window (token rule, or the tile rule applied to the tokens' tiles);
    video queries see every text key; text queries see every key.
    """
    T, Hg, Wg = layout.grid
    nv = T * Hg * Wg
    if config.kernel_size is not None:
        video = natten_token_mask_reference(layout.grid, config.kernel_size, config.stride, config.dilation,
                                            (config.causal, False, False))[None]
    else:
        windows = config.window if isinstance(config.window[0], tuple) else (config.window,)
        tiles = tuple(-(-g // t) for g, t in zip(layout.grid, layout.tile))
        tile_of = torch.tensor([((f // layout.tile[0]) * tiles[1] + y // layout.tile[1]) * tiles[2]
                                + x // layout.tile[2] for f in range(T) for y in range(Hg) for x in range(Wg)])
        video = torch.stack([tile_window_mask_reference(tiles, w)[tile_of][:, tile_of] for w in windows])
    s = layout.seq_len
    m = torch.ones(video.shape[0], s, s, dtype=torch.bool)
    v0 = layout.text_tokens if layout.text_position == "before" else 0
    m[:, v0:v0 + nv, v0:v0 + nv] = video
    return m[0] if m.shape[0] == 1 else m


def _tile_axis_allowed(x: int, xk: int, length: int, tile: int, window: int) -> bool:
    """Tile window on one axis (docs/neighborhood.md#tile-windows): the key's tile lies in the window of the query's
    tile."""
    n = -(-length // tile)
    g, gk = x // tile, xk // tile
    start = min(max(g - window // 2, 0), max(n - window, 0))
    return start <= gk < start + min(window, n)


def block_box_mask_reference(layout, config) -> torch.Tensor:
    """bool ``[Hw, Nv, Nv]`` video block mask by loops over bounding-box coordinates, one axis at a time."""
    from .layout import block_bbox_reference

    boxes = block_bbox_reference(layout)
    if config.kernel_size is not None:
        causal = (config.causal, False, False)
        rules = [[lambda x, xk, a=a: natten_axis_allowed(x, xk, layout.grid[a], config.kernel_size[a],
                                                         config.stride[a], config.dilation[a], causal[a])
                  for a in range(3)]]
    else:
        windows = config.window if isinstance(config.window[0], tuple) else (config.window,)
        rules = [[lambda x, xk, a=a, w=w: _tile_axis_allowed(x, xk, layout.grid[a], layout.tile[a], w[a])
                  for a in range(3)] for w in windows]
    nv = len(boxes)
    m = torch.zeros(len(rules), nv, nv, dtype=torch.bool)
    for h, rule in enumerate(rules):
        for i, (lo_i, hi_i) in enumerate(boxes):
            for j, (lo_j, hi_j) in enumerate(boxes):
                m[h, i, j] = all(any(rule[a](x, xk) for x in range(lo_i[a], hi_i[a] + 1)
                                     for xk in range(lo_j[a], hi_j[a] + 1)) for a in range(3))
    return m


def masked_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 attention on ``[B, S, H, D]`` under a bool element mask ``[S, S]`` or ``[H, S, S]``.

    Returns ``(out [B, S, H, D] float64, lse [B, H, S] float64)``; rows with no key give 0 and ``-inf``.
    """
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q, k, v = (t.double().transpose(1, 2) for t in (query, key, value))  # [B, H, S, D]
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask.expand_as(s), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return (p @ v).transpose(1, 2), lse
