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
           "frame_overlap_mask", "adjacent_blocks", "keep_blocks"]


def keep_blocks(num_blocks: int, sparsity: float) -> int:
    """THE budget rounding rule of every method: ``ceil((1 - sparsity) * num_blocks)`` blocks kept, the product
    rounded to 9 decimals before the ceiling so that binary round-off never adds or drops a block
    (``(1 - 0.7) * 10 = 3.0000000000000004`` keeps 3; ``(1 - 0.8) * 900 = 179.99999999999997`` keeps 180).
    Sparsity 0.9 on 64 blocks keeps 7 in draft and rectification alike (density never below the target)."""
    return min(num_blocks, max(0, math.ceil(round((1.0 - sparsity) * num_blocks, 9))))


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
