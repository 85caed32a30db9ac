"""Critical-block selection of pooled rectification: top-p over ``P̃`` with a top-k floor, tile neighbours,
the first-frame rule, and the final block mask of a call (selected, or given)."""

from __future__ import annotations

import math

import torch

from ..._env import checks_enabled
from ...layout import TokenLayout
from ..base import adjacent_blocks, forced_mask, frame0_blocks, nearest_adjacent_blocks
from .config import PooledRectificationConfig, _check_config, _check_scale, _normalise_mask
from .statistics import block_statistics, ipar_probabilities, row_outlier_count

__all__ = ["MASS_SLACK", "neighbour_mask", "rectified_mask", "select_critical_blocks", "selection_width"]


def neighbour_mask(layout: TokenLayout, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[Nv, Nv]``: the 3-D neighbours of each video block (self included).

    For tiles: tile coordinates differ by <= 1 on every axis. For any block (packed edge blocks included): the
    gap between the two blocks' token bounding boxes is less than one tile side on every axis
    (:func:`dit_sparse.methods.base.adjacent_blocks`, the same rule on tiles). Cached per (layout, device).
    """
    return adjacent_blocks(layout, device)


def _first_frame_mask(layout: TokenLayout, device) -> torch.Tensor:
    first = frame0_blocks(layout, device)
    return first.view(-1, 1) & first.view(1, -1)


def _sortable_keys(p_tilde: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is (P̃ descending, column index ascending): exact, deterministic ties.

    Non-negative float32 values keep their order when their bits are read as int32; the low 32 bits hold the
    reversed column index so that among exactly equal values the lower column ranks first.
    """
    ncol = p_tilde.shape[-1]
    bits = p_tilde.clamp_min(0.0).contiguous().view(torch.int32).to(torch.int64)
    rev = (ncol - 1) - torch.arange(ncol, device=p_tilde.device, dtype=torch.int64)
    return (bits << 32) | rev


#: how far below 1 a row's mass may fall and still have its top-p count inside :func:`selection_width` (float32
#: rows of a softmax sum to 1 within ~1e-6)
MASS_SLACK = 1e-3


def selection_width(ncol: int, top_k: int, top_p: float) -> int:
    """Candidates ranked per row by :func:`select_critical_blocks`: the top-k floor plus one (the text column may
    rank among them), and the top-p count of a row of mass >= ``1 / (1 + MASS_SLACK)``, plus one for round-off."""
    top_p_count = math.floor(top_p * ncol * (1 + MASS_SLACK)) + 2
    return min(ncol, max(top_k + 1, top_p_count))


def select_critical_blocks(p_tilde: torch.Tensor, layout: TokenLayout,
                           config: PooledRectificationConfig) -> torch.Tensor:
    """Critical-block selection (docs/rectification.md#selection) from ``P̃`` -> bool block mask ``[B, H, N, N]``.

    Per (batch, head, video query block), rank the ``Nv + 1`` entries of ``P̃`` (video blocks and the collapsed
    text column, as in the reference) by descending value; exact ties rank the lower column index first (video
    blocks in tile order, then the text column). Top-p: ``n_need = #{cumsum <= top_p} + 1`` leading entries of that
    ranking (cumulative sums in float64), as in the reference. Top-k floor: at least ``top_k = config.top_k(Nv)``
    **video** blocks, the highest-ranked ones. The kept video blocks are therefore the first
    ``max(#video entries among the n_need leading entries, top_k)`` video entries of the ranking. The text column
    is always on, so unlike the reference it never takes a video block's place under the floor (otherwise
    ``sparsity=0`` would not be dense). Then OR in the tile neighbours (``config.neighbours``; the nearest
    ``config.neighbour_count(Nv)`` of them under ``neighbour_share``), the first-frame
    rule (``config.first_frame_dense``), all text columns and dense text rows. The diagonal is not forced beyond
    that.

    Ranks only the ``W = selection_width(Nv + 1, top_k, top_p)`` leading entries of each row (``torch.topk`` on
    unique keys: the same order as a full sort, exact ties included). ``W`` depends on the config and the grid
    only, never on the values (no device sync): it covers the top-k floor, and the top-p count of any row whose
    mass is at least ``1 / (1 + MASS_SLACK)`` (the leading ``n`` entries of a row hold at least ``n / (Nv + 1)``
    of its mass, so such a row reaches ``top_p`` within ``floor(top_p (Nv + 1) (1 + MASS_SLACK)) + 1`` entries).
    :func:`ipar_probabilities` rows sum to 1, so the result equals the full-sort ranking
    (:func:`dit_sparse.reference.rectification.select_sorted_reference`). A row with less mass that does not
    reach ``top_p`` within ``W`` entries keeps every video block (a superset); ``DIT_SPARSE_CHECKS=1`` raises
    instead.

    Args:
        p_tilde (`torch.Tensor`, float32 ``[B, H, Nv, Nv + 1]``): from :func:`ipar_probabilities` (rows sum to 1).
        layout (`TokenLayout`), config (`PooledRectificationConfig`).
    """
    nv, n = layout.num_video_blocks, layout.num_blocks
    if p_tilde.dim() != 4 or p_tilde.shape[-2:] != (nv, nv + 1):
        raise ValueError(f"p_tilde must be [B, H, Nv={nv}, Nv + 1={nv + 1}] for {layout!r}, got "
                         f"{tuple(p_tilde.shape)}; compute it with ipar_probabilities.")
    b, h = p_tilde.shape[:2]
    dev = p_tilde.device
    ncol = nv + 1
    top_k = config.top_k(nv)
    p_tilde = p_tilde.to(torch.float32)  # rank and accumulate exactly the fp32 values the keys encode
    keys = _sortable_keys(p_tilde)
    width = selection_width(ncol, top_k, config.top_p)
    idx = keys.topk(width, dim=-1).indices  # sorted, descending: the first `width` entries of the full ranking
    cum = p_tilde.gather(-1, idx).to(torch.float64).cumsum(-1)
    n_need = (cum <= config.top_p).sum(-1, keepdim=True) + 1  # [B, H, Nv, 1] leading entries for top-p
    is_video = idx < nv
    video_rank = is_video.cumsum(-1)  # 1-based rank among the video entries
    rank = torch.arange(width, device=dev)
    live = is_video & ((rank < n_need) | (video_rank <= top_k))
    picked = torch.zeros(b, h, nv, ncol + 1, dtype=torch.bool, device=dev)
    picked.scatter_(-1, torch.where(live, idx, torch.full_like(idx, ncol)), True)
    if width < ncol:  # rows whose top-p set may reach past the candidates (mass below 1 / (1 + MASS_SLACK))
        short = cum[..., -1:] <= config.top_p
        if checks_enabled() and bool(short.any()):
            raise ValueError(f"select_critical_blocks: some rows of p_tilde do not reach top_p={config.top_p} "
                             f"within their {width} largest entries (row mass {float(p_tilde.sum(-1).min()):.6g} "
                             f"at least; expected rows summing to 1); pass probabilities from ipar_probabilities.")
        picked[..., :nv] |= short

    mask = forced_mask(layout, diagonal=False, device=dev).expand(b, h, n, n).clone()
    mask[:, :, :nv, :nv] |= picked[..., :nv]
    extra = None
    if config.neighbours:
        cap = config.neighbour_count(nv)
        extra = neighbour_mask(layout, dev) if cap is None else nearest_adjacent_blocks(layout, cap, dev)
    if config.first_frame_dense and layout.frames > 1:
        ff = _first_frame_mask(layout, dev)
        extra = ff if extra is None else extra | ff
    if extra is not None:
        mask[:, :, :nv, :nv] |= extra
    return mask


def rectified_mask(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout,
                   config: PooledRectificationConfig, scale: float | None = None) -> torch.Tensor:
    """The Rectified SpaAttn block mask: pooling, IPAR, then :func:`select_critical_blocks`.

    Args:
        q_perm, k_perm (`torch.Tensor`, ``[B, P, H, D]``): permuted by ``layout``.
        layout (`TokenLayout`), config (`PooledRectificationConfig`).
        scale (`float`, *optional*): the model's softmax scale, defaults to ``1 / sqrt(D)``.

    Returns:
        bool ``[B, H, N, N]``.
    """
    _check_config(config)
    scale = _check_scale(q_perm, scale)
    stats = block_statistics(q_perm, k_perm, None, layout, deviations=False)
    return select_critical_blocks(ipar_probabilities(stats, scale), layout, config)


def _stats_and_mask(q_perm, k_perm, v_perm, layout, config, scale, mask):
    """Pooled statistics, their IPAR probabilities and the final block mask (given, or the selection)."""
    stats = block_statistics(q_perm, k_perm, v_perm if config.rectify else None, layout,
                             deviations=config.rectify and config.gapr,
                             outliers=row_outlier_count(config))
    p_tilde = ipar_probabilities(stats, scale)
    if mask is None:
        mask = select_critical_blocks(p_tilde, layout, config)
    else:
        mask = _normalise_mask(mask, layout, q_perm.device) | forced_mask(layout, diagonal=False,
                                                                           device=q_perm.device)
    return stats, p_tilde, mask
