"""Shared machinery of the four methods: block pooling, forced blocks, masks -> plans.

Every method works on **permuted** tensors (``TokenLayout.permute``: video tiles first, then text blocks,
``P = layout.padded_len`` slots, zeros in padding slots) and produces a bool block mask ``[B, H, N, N]`` over
the layout's ``N = layout.num_blocks`` blocks (or ``[1, 1, N, N]`` when it does not depend on the data).
Masks compose by union; :func:`plan_from_mask` turns the final one into a :class:`~dit_sparse.SparsePlan`.

Shapes: B batch, P padded sequence, H heads, D head dim, N blocks (video ``Nv`` first, then text).
"""

from __future__ import annotations

import math

import torch

from .._cache import tensor_cache
from ..layout import TokenLayout
from ..plan import SparsePlan

__all__ = ["pool_blocks", "forced_mask", "plan_from_mask", "check_permuted", "frame0_blocks", "has_temporal_sink",
           "frame_overlap_mask", "adjacent_blocks", "nearest_adjacent_blocks", "keep_blocks", "share_blocks",
           "check_share"]


def keep_blocks(num_blocks: int, sparsity: float) -> int:
    """THE budget rounding rule of every method: ``ceil((1 - sparsity) * num_blocks)`` blocks kept, the product
    rounded to 9 decimals before the ceiling so that binary round-off never adds or drops a block
    (``(1 - 0.7) * 10 = 3.0000000000000004`` keeps 3; ``(1 - 0.8) * 900 = 179.99999999999997`` keeps 180).
    Sparsity 0.9 on 64 blocks keeps 7 in draft and rectification alike (density never below the target)."""
    return min(num_blocks, max(0, math.ceil(round((1.0 - sparsity) * num_blocks, 9))))


def share_blocks(budget: int, share: float) -> int:
    """Blocks a rule capped to ``share`` of a row's ``budget`` may take: ``floor(share * budget)``, the product
    rounded to 9 decimals first (as :func:`keep_blocks`), so a share never takes more than it says (0 on a budget
    too small for one block)."""
    return max(0, math.floor(round(share * budget, 9)))


def check_share(value, owner: str, name: str, fix: str) -> float | None:
    """``value`` as a float share in ``(0, 1]`` (or None); else a ValueError naming ``owner.name`` and ``fix``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{owner}.{name}: got {value!r}, expected a float in (0, 1] (share of a row's block "
                         f"budget) or None; fix: {fix}.")
    return float(value)


def check_permuted(x: torch.Tensor, layout: TokenLayout, name: str = "query") -> None:
    if x.dim() != 4 or x.shape[1] != layout.padded_len:
        raise ValueError(f"{name} must be permuted [B, P={layout.padded_len}, H, D] for {layout!r}, got "
                         f"{tuple(x.shape)}; call layout.permute({name}) first.")


def pool_blocks(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """True-count block means of a permuted ``[B, P, H, D]`` tensor -> float32 ``[B, H, N, D]``.

    Padding slots are zero after ``permute``, so the block sum over all slots divided by ``block_valid``
    is the mean over real tokens only (the reference implementations average the zeros in: a bias).
    """
    check_permuted(x, layout, "x")
    b, _, h, d = x.shape
    n, bs = layout.num_blocks, layout.block_size
    sums = x.view(b, n, bs, h, d).sum(2, dtype=torch.float32)  # [B, N, H, D]
    valid = layout.block_valid(x.device).clamp(min=1).to(torch.float32)
    return (sums / valid.view(1, n, 1, 1)).permute(0, 2, 1, 3)


# ------------------------------------------------------------------ block coordinate rules
# A block's coordinates are the bounding box of its real tokens (``layout.block_bbox``). On a block that is one
# tile these rules are the familiar tile-coordinate rules; on a packed edge block they follow its box.
def frame0_blocks(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[Nv]``: video blocks holding a token of latent frame 0 (the tiles of temporal tile index 0)."""
    return layout.block_bbox(device)[:, 0, 0] == 0


@tensor_cache(maxsize=64)
def has_temporal_sink(layout: TokenLayout) -> bool:
    """Whether some video block holds no frame-0 token (else a frame-0 sink would be every block). Decided once
    per layout on its cached CPU indices (memoized: later calls read no tensor, and compiled code sees a constant)."""
    return bool((layout.block_bbox("cpu")[:, 0, 0] > 0).any())


@tensor_cache(maxsize=32)
def _frame_overlap(layout: TokenLayout, device: str) -> torch.Tensor:
    box = layout.block_bbox(device)
    lo, hi = box[:, 0, 0], box[:, 1, 0]
    return (lo.view(-1, 1) <= hi.view(1, -1)) & (lo.view(1, -1) <= hi.view(-1, 1))


def frame_overlap_mask(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[Nv, Nv]``: the two blocks' frame ranges overlap (same temporal tile row, for tiles). Cached."""
    return _frame_overlap(layout, str(torch.device(device)))


@tensor_cache(maxsize=32)
def _adjacent(layout: TokenLayout, device: str) -> torch.Tensor:
    box = layout.block_bbox(device)
    lo, hi = box[:, 0], box[:, 1]  # [Nv, 3]
    gap = torch.maximum(lo.unsqueeze(1) - hi.unsqueeze(0), lo.unsqueeze(0) - hi.unsqueeze(1)) - 1  # [Nv, Nv, 3]
    tile = torch.tensor(layout.tile, device=box.device)
    return (gap < tile).all(-1)


def adjacent_blocks(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[Nv, Nv]`` (self included): on every axis the gap between the two blocks' boxes is less than one
    tile side. For two tiles this is "tile coordinates differ by <= 1 on every axis". Cached per (layout, device).
    """
    return _adjacent(layout, str(torch.device(device)))


@tensor_cache(maxsize=32)
def _nearest_adjacent(layout: TokenLayout, count: int, device: str) -> torch.Tensor:
    adj = _adjacent(layout, "cpu")
    nv = adj.shape[0]
    box = layout.block_bbox("cpu").to(torch.float64)
    tile = torch.tensor(layout.tile, dtype=torch.float64)
    centre = (box[:, 0] + box[:, 1]) / 2 / tile  # [Nv, 3] in tiles
    d = (centre.unsqueeze(1) - centre.unsqueeze(0)).abs()  # [Nv, Nv, 3]
    eye = torch.eye(nv, dtype=torch.bool)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    keys = [d[..., 0], d.sum(-1), torch.where(adj, d.amax(-1), inf)]  # least significant first (stable sorts)
    order = torch.arange(nv).expand(nv, nv).clone()
    for key in keys:
        key = torch.where(eye, torch.full_like(key, -1.0), key)  # the block itself first
        order = order.gather(1, key.gather(1, order).sort(dim=1, stable=True).indices)
    take = torch.zeros(nv, nv, dtype=torch.bool)
    take.scatter_(1, order[:, :count], True)
    return (take & adj).to(device)


def nearest_adjacent_blocks(layout: TokenLayout, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """bool ``[Nv, Nv]``: per row the ``count`` nearest of its :func:`adjacent_blocks` (fewer where it has fewer),
    the block itself first, then by the distance of the box centres in tiles: Chebyshev (the larger axis),
    then the sum over axes, then the time axis (same-frame neighbours before earlier or later ones), then the
    lower block index. Data-independent, cached per (layout, count, device). ``count >= 27`` (or the adjacency's
    widest row) is :func:`adjacent_blocks` itself; 0 is no block."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"nearest_adjacent_blocks: count must be an int >= 0, got {count!r}.")
    return _nearest_adjacent(layout, count, str(torch.device(device)))


def forced_mask(layout: TokenLayout, *, diagonal: bool = True, sink: bool = False,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Blocks every method keeps, bool ``[N, N]``.

    * text columns are on for every row and text rows are dense (pooled text destroys the text sink);
    * ``diagonal``: every video query block reads its own block;
    * ``sink``: every video query block reads the blocks holding latent frame 0 (:func:`frame0_blocks`; only when
      some block holds no frame-0 token, else the sink would be every block).
    """
    n, nv = layout.num_blocks, layout.num_video_blocks
    m = torch.zeros(n, n, dtype=torch.bool, device=device)
    m[:, nv:] = True
    m[nv:, :] = True
    if diagonal:
        idx = torch.arange(nv, device=device)
        m[idx, idx] = True
    if sink and has_temporal_sink(layout):
        m[:nv, :nv] |= frame0_blocks(layout, device).view(1, nv)
    return m


def plan_from_mask(mask: torch.Tensor, layout: TokenLayout) -> SparsePlan:
    """A plan over the permuted sequence from a bool block mask ``[B, H, N, N]`` (or ``[N, N]``)."""
    if mask.dim() == 2:
        mask = mask[None, None]
    n = layout.num_blocks
    if mask.shape[-2:] != (n, n):
        raise ValueError(f"Block mask {tuple(mask.shape)} does not match {layout!r}: expected [..., {n}, {n}].")
    return SparsePlan.from_dense(mask, block_q=layout.block_size, block_k=layout.block_size,
                                 seq_q=layout.padded_len, seq_k=layout.padded_len,
                                 kv_block_valid=layout.block_valid(mask.device))
