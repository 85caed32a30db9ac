"""Forced blocks of a config on a layout: the video key blocks a row keeps whatever the input, against its budget.

A selector chooses ``budget`` video key blocks per video query row (draft: ``row_budget``; Rectified SpaAttn as
the selector: its top-k floor ``top_k``; both the one rule ``keep_blocks``). Some of them are forced: the
draft's diagonal (and a ``sink_share=None`` sink, ``same_frame``), rectification's neighbours and first frame,
a neighbourhood window. A row whose forced blocks fill its budget is a static mask: the input changes nothing.

* :func:`forced_blocks` counts them from the config and the layout alone (host, no data);
* :func:`measured_forced` counts them the honest way: the blocks the engine selects for *every one* of several
  unrelated inputs. It is at least :func:`forced_blocks` (a forced block is in every mask) and, on unrelated
  inputs, only chance agreements above it.

Shares are per row: ``forced / budget`` of the row that forces most (``share``) and the mean over video query
rows (``mean_share``). Text columns are read by every row and outside the budget; they are not counted here
(they cost what they read: the text tokens). ``reserved``: blocks of the budget a rule keeps but the input
chooses (the draft's ``sink_share`` sink: its best frame-0 blocks), reported beside ``forced``.

    f = forced_blocks(config, layout)
    f.share, f.budget, f.forced_max            # e.g. 0.019, 52, 1 for wan2.1-t2v-1.3b:draft-80 at 21x30x52
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from .base import frame0_blocks, nearest_adjacent_blocks
from .draft_attention import forced_draft_mask, row_budget, sink_blocks
from .engine import SparseAttention, SparseAttentionConfig
from .neighborhood import neighborhood_mask
from .rectification.selection import neighbour_mask

__all__ = ["ForcedBlocks", "forced_blocks", "forced_video_mask", "measured_forced", "selection_budget"]


@dataclass(frozen=True)
class ForcedBlocks:
    """Forced video key blocks per video query row of a config on a layout (see the module docstring).

    ``method``: ``"draft"``, ``"rectification"`` (its own selection) or ``"window"`` (a neighbourhood window
    alone: static by design, no budget, ``share`` None). ``budget``: video blocks per row the sparsity allows.
    ``forced_max`` / ``forced_mean``: forced blocks of the row that forces most / mean over rows. ``reserved``:
    budget blocks a rule keeps but the input chooses. ``video_blocks``: ``Nv``. ``density``
    (:func:`measured_forced` only): mean fraction of video x video block pairs the masks read.
    """

    method: str
    video_blocks: int
    budget: int | None
    forced_max: int
    forced_mean: float
    reserved: int = 0
    density: float | None = None

    @property
    def share(self) -> float | None:
        """``forced_max / budget`` (None without a budget)."""
        return None if not self.budget else self.forced_max / self.budget

    @property
    def mean_share(self) -> float | None:
        return None if not self.budget else self.forced_mean / self.budget

    @property
    def committed_share(self) -> float | None:
        """``(forced_max + reserved) / budget``: the share of the budget the input does not choose freely."""
        return None if not self.budget else (self.forced_max + self.reserved) / self.budget


def _method(config: SparseAttentionConfig) -> str:
    if config.draft is not None:
        return "draft"
    if config.neighborhood is not None:
        return "window"
    if config.rectification is not None:
        return "rectification"
    raise ValueError("forced_blocks: the config has no selector (everything dense); nothing is selected.")


def selection_budget(config: SparseAttentionConfig, layout: TokenLayout) -> int | None:
    """Video key blocks per video query row the config's selector may choose on ``layout``: the draft's
    ``row_budget``, rectification's top-k floor (when it selects), None for a window alone."""
    nv = layout.num_video_blocks
    method = _method(config)
    if method == "draft":
        d = config.draft
        return row_budget(nv, d.sparsity, d.k_min)
    if method == "rectification":
        return config.rectification.top_k(nv)
    return None


def forced_video_mask(config: SparseAttentionConfig, layout: TokenLayout) -> torch.Tensor:
    """bool ``[Nv, Nv]`` (CPU): the video key blocks each video query row keeps whatever the input (heads in
    ``dense_heads`` aside: their rows are all on)."""
    nv = layout.num_video_blocks
    method = _method(config)
    m = torch.zeros(nv, nv, dtype=torch.bool)
    if method == "draft":
        m |= forced_draft_mask(layout, config.draft, "cpu")[:nv, :nv]
    if config.neighborhood is not None:
        nb = neighborhood_mask(layout, config.neighborhood, "cpu")
        m |= nb.reshape(-1, *nb.shape[-2:]).all(0)[:nv, :nv]  # on in every head
    if method == "rectification":
        rect = config.rectification
        if rect.neighbours:
            cap = rect.neighbour_count(nv)
            m |= neighbour_mask(layout) if cap is None else nearest_adjacent_blocks(layout, cap)
        if rect.first_frame_dense and layout.frames > 1:
            f0 = frame0_blocks(layout)
            m |= f0.view(-1, 1) & f0.view(1, -1)
    return m


def forced_blocks(config: SparseAttentionConfig, layout: TokenLayout) -> ForcedBlocks:
    """Forced video blocks per row of ``config`` on ``layout`` against its budget, from the config alone."""
    counts = forced_video_mask(config, layout).sum(-1).float()
    reserved = sink_blocks(layout, config.draft) if config.draft is not None else 0
    return _counted(config, layout, counts, reserved=reserved)


@torch.no_grad()
def measured_forced(config: SparseAttentionConfig, layout: TokenLayout, inputs) -> ForcedBlocks:
    """The honest count: video key blocks the engine's mask (:meth:`SparseAttention.build_mask`) keeps for every
    one of ``inputs`` (an iterable of permuted ``(q, k)`` or ``(q, k, scale)``, each ``[B, P, H, D]``), in every
    batch entry and head, per video query row. ``reserved`` is 0: what the input chooses is not counted."""
    nv = layout.num_video_blocks
    engine = SparseAttention(config)
    common, densities = None, []
    for item in inputs:
        qp, kp, *rest = item
        mask = engine.build_mask(qp, kp, layout, rest[0] if rest else None)[..., :nv, :nv]
        densities.append(float(mask.float().mean()))
        every = mask.reshape(-1, nv, nv).all(0).cpu()
        common = every if common is None else common & every
    if common is None:
        raise ValueError("measured_forced: no inputs given; pass at least two unrelated (q, k) pairs.")
    counts = common.sum(-1).float()
    return _counted(config, layout, counts, density=sum(densities) / len(densities))


def _counted(config: SparseAttentionConfig, layout: TokenLayout, counts: torch.Tensor, **extra) -> ForcedBlocks:
    """``ForcedBlocks`` from per-row forced counts (float ``[rows]``) and the config's budget."""
    nv = layout.num_video_blocks
    return ForcedBlocks(method=_method(config), video_blocks=nv, budget=selection_budget(config, layout),
                        forced_max=int(counts.max()) if nv else 0, forced_mean=float(counts.mean()) if nv else 0.0,
                        **extra)
