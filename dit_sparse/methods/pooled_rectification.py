"""Pooled rectification: Rectified SpaAttn (arXiv 2511.19835; BienLuky/Rectified-SpaAttn), ALGORITHMS.md §4.

Plain block-sparse attention renormalises over the kept key blocks (it *amplifies* them by ``1 / kept mass``) and
*loses* the dropped blocks. Rectified SpaAttn estimates every block's share of the full attention from pooled
(block-mean) queries and keys and corrects both biases in the output epilogue of the one sparse kernel (§2.3)::

    O_u = R_i * SparseAttn_u(C_i) + c_i          for every query token u of video block i

* **IPAR** (isolated-pooling attention reallocation, §4.3): ``P̃ [B, H, Nv, Nv + 1]``, the block-level attention of
  pooled queries over pooled video keys (weighted by their true token counts) **plus every valid text token
  un-pooled**, with the text mass collapsed into one column. ``R_i`` is the mass ``P̃`` gives to the blocks the sparse
  kernel reads (plus the dropped blocks whose pooled estimate is not trusted).
* **GAPR** (gain-aware pooling rectification, §4.5): a dropped block ``j`` is compensated with ``P̃_ij * v̄_j`` only
  where the pooled logit's magnitude exceeds a first-order bound on its pooling error (``Z_ij = G_ij > E_ij``).
* **Selection** (§4.4): per query block, top-p (``top_p``) over ``P̃`` with a top-k floor
  (``int((1 - sparsity) * Nv)``), plus 3-D tile neighbours, text columns, dense text rows and (Wan) the
  first-frame rule.

Everything works on **permuted** tensors (``TokenLayout.permute``: video tiles first, then text blocks, zeros in
padding slots) and is vectorised over batch, heads and blocks. Pooled statistics are true-count means (the
reference averages zero padding in). ``R`` and ``c`` are per query block and ride on the plan's epilogue
(``out_scale = R [B, H, N]``, ``out_bias = c.transpose(1, 2) [B, N, H, D]``).

Shapes: B batch, P = ``layout.padded_len``, H heads, D head dim, N = ``layout.num_blocks`` blocks (``Nv`` video
first, then text), Nt = ``layout.text_tokens``.

Example::

    layout = TokenLayout(frames=21, height=30, width=52)
    q, k, v = (layout.permute(t) for t in (query, key, value))        # [B, P, H, D]
    plan = rectified_plan(q, k, v, layout, PooledRectificationConfig(sparsity=0.8))
    out = layout.unpermute(dit_sparse.block_sparse_attention(q, k, v, plan))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._env import checks_enabled
from ..layout import TokenLayout
from ..ops import block_sparse_attention
from ..plan import SparsePlan
from ..segment import PooledSegment
from .base import (
    adjacent_blocks,
    check_permuted,
    forced_mask,
    frame0_blocks,
    keep_blocks,
    plan_from_mask,
    pool_blocks,
)

__all__ = [
    "BlockStatistics",
    "PooledRectificationConfig",
    "block_statistics",
    "COMBINE_MODES",
    "ROW_KEYS",
    "gapr_reliable",
    "ipar_probabilities",
    "merge_partials",
    "neighbour_mask",
    "pooled_remainder",
    "pooled_segment",
    "rectification_terms",
    "rectified_attention",
    "rectified_mask",
    "rectified_plan",
    "row_outlier_count",
    "row_rectified_attention",
    "select_critical_blocks",
]

#: ``"block"``: reference per-query-block epilogue; ``"row"``: pooled keys of the skipped blocks in each row's softmax
COMBINE_MODES = ("block", "row")

#: how a skipped block enters the per-row softmax (``combine="row"``): ``"mean"``, one pooled key (mean key and
#: value, weight n_j); ``"outlier"``, its ``row_outliers`` most deviating keys exactly plus one pooled key for the
#: other n_j - row_outliers
ROW_KEYS = ("mean", "outlier")

#: elements of one chunk of per-row pooled logits ``[B, h, Pv, Nv]`` in :func:`pooled_remainder`
_ROW_CHUNK = 1 << 24


# ---------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True, kw_only=True)
class PooledRectificationConfig:
    """Configuration of pooled rectification (Rectified SpaAttn). Defaults follow the reference code.

    Args:
        sparsity (`float`, defaults to 0.8): target fraction of video x video block pairs skipped
            (reference ``sa_drop_rate``). Sets the top-k floor ``ceil((1 - sparsity) * Nv)`` of kept key entries
            per query block (see :meth:`top_k`). In ``[0, 1]``; 0 keeps every block.
        top_p (`float`, defaults to 0.3): top-p mass (reference ``p_remain_rates``): per query block keep the fewest
            highest-``P̃`` entries whose cumulative mass exceeds ``top_p`` (then at least the top-k floor). In
            ``[0, 1]``.
        neighbours (`bool`, defaults to True): always keep the 3-D tile neighbours of each query tile (tile
            coordinates differing by <= 1 on every axis; 27 including itself in the interior; packed edge blocks by
            their bounding boxes, see :func:`neighbour_mask`).
        gapr (`bool`, defaults to True): compensate a dropped block only where its pooled estimate is reliable
            (``G_ij > E_ij``). ``False`` is the paper's "naive" rectification: every dropped block is compensated.
        first_frame_dense (`bool`, defaults to False): Wan rule ``mask[:ff, :ff] = True``: the blocks holding
            latent frame 0 read each other fully (only when ``frames > 1``; it is not a global sink).
        rectify (`bool`, defaults to True): attach the epilogue ``(R, c)`` to the plan. ``False`` keeps only the
            selection (plain block-sparse attention on the same blocks).
        combine (`str`, defaults to ``"block"``): how the pooled estimate meets the sparse output.
            ``"block"`` is the reference: ``O_u = R_i * SparseAttn_u + c_i`` with ``R``, ``c`` per query block in the
            kernel epilogue. ``"row"`` [ours] keeps the exact softmax normalisation of the blocks read and pools
            only the skipped ones, per query row: one softmax over the exact logits of the read keys and the pooled
            logits ``q_u · k̄_j * scale + log n_j`` of the skipped reliable blocks (values ``v̄_j``), read by the
            kernel in the same online softmax, one pass (:func:`pooled_segment`; the earlier two-pass LSE merge,
            :func:`pooled_remainder` + :func:`merge_partials`, stays as a cross-check). GAPR per row compares
            ``|q_u · k̄_j|`` with ``|q_u · b_j|``.
        row_keys (`str`, defaults to ``"outlier"``): with ``combine="row"``, how a skipped block enters the softmax.
            ``"mean"``: one pooled key (``k̄_j``, ``v̄_j``, weight ``n_j``), gated by GAPR per row when ``gapr``.
            ``"outlier"`` [ours; the sharp-attention safeguard of issue 14]: the block's ``row_outliers`` most
            deviating keys (largest ``||k_t - k̄_j||``, lowest slot on ties) exactly, with their own values, plus
            one pooled key for the other ``n_j - row_outliers`` tokens (a block of ``n_j <= row_outliers`` real
            tokens enters wholly exactly, no pooled key); no gate (``gapr`` is ignored). A block mean hides an
            isolated bright key and a row's remainder then over-weights the dark field; the exact outliers restore
            it (measured in ``benchmarks/row_safeguard.py`` and ``benchmarks/pooled_peers.py``).
        row_outliers (`int`, defaults to 2): with ``row_keys="outlier"``, how many most deviating keys of each
            skipped block are kept exactly (``>= 1``; the segment then holds ``(row_outliers + 1) * Nv`` keys).
            Ignored by ``row_keys="mean"`` (like ``gapr`` by ``"outlier"``). 2 is the smallest count never worse
            than the selection alone on the structured families at 16- and 128-token blocks and on the embedded
            model's attention (1 is worse at 128-token blocks, where a block can hold several bright keys;
            ``python benchmarks/row_safeguard.py --outliers``).

    Example::

        config = PooledRectificationConfig(sparsity=0.85)
        plain = dataclasses.replace(config, rectify=False)
    """

    sparsity: float = 0.8
    top_p: float = 0.3
    neighbours: bool = True
    gapr: bool = True
    first_frame_dense: bool = False
    rectify: bool = True
    combine: str = "block"
    row_keys: str = "outlier"
    row_outliers: int = 2

    def __post_init__(self) -> None:
        for name in ("sparsity", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
                raise ValueError(f"PooledRectificationConfig.{name} must be a number in [0, 1], got {v!r}.")
            object.__setattr__(self, name, float(v))
        for name in ("neighbours", "gapr", "first_frame_dense", "rectify"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"PooledRectificationConfig.{name} must be a bool, got {v!r} "
                                 f"({type(v).__name__}).")
        if self.row_keys not in ROW_KEYS:
            raise ValueError(f"PooledRectificationConfig.row_keys must be one of {ROW_KEYS}, got {self.row_keys!r}.")
        v = self.row_outliers
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"PooledRectificationConfig.row_outliers must be an int >= 1 (exact keys per skipped "
                             f"block with row_keys='outlier'), got {v!r}.")
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"PooledRectificationConfig.combine must be one of {COMBINE_MODES}, got "
                             f"{self.combine!r}.")

    @property
    def per_row(self) -> bool:
        """True when the correction is per row (``rectify`` and ``combine="row"``): a pooled key segment read in the
        kernel's softmax (:func:`pooled_segment`) instead of the plan's epilogue."""
        return self.rectify and self.combine == "row"

    def top_k(self, num_video_blocks: int) -> int:
        """The top-k floor ``ceil((1 - sparsity) * num_video_blocks)``: the budget rule every method shares
        (:func:`~dit_sparse.methods.base.keep_blocks`; the reference floors, ``int(...)``, so at sparsity 0.9 on 64
        blocks it keeps 6 where draft keeps 7: ours keeps 7 in both)."""
        return keep_blocks(num_video_blocks, self.sparsity)


# ---------------------------------------------------------------------------------------------------- pooling
@dataclass(frozen=True)
class BlockStatistics:
    """Pooled statistics of the video blocks (float32), inputs to IPAR and GAPR.

    Args:
        q_mean, k_mean, v_mean (`torch.Tensor`, ``[B, H, Nv, D]``): true-count block means.
        k_text (`torch.Tensor`, ``[B, H, Nt, D]``): the valid text keys, un-pooled ("isolated").
        counts (`torch.Tensor`, ``[Nv]``): real tokens per video block.
        q_dev, k_dev (`torch.Tensor`, ``[B, H, Nv, D]`` or None): GAPR deviations ``mean_u |x_u - x̄|`` over real
            tokens only (None when not computed).
        k_out, v_out (`torch.Tensor`, ``[B, H, Nv, M, D]`` or None): each block's ``M`` most deviating real keys
            (largest ``||k_t - k̄_j||`` first, lowest slot on ties) and their values (``row_keys="outlier"``, ``M =
            row_outliers``; None when not computed). Ranks ``r >= n_j`` (a block with fewer real tokens) are zeros.
    """

    q_mean: torch.Tensor
    k_mean: torch.Tensor
    v_mean: torch.Tensor | None
    k_text: torch.Tensor
    counts: torch.Tensor
    q_dev: torch.Tensor | None = None
    k_dev: torch.Tensor | None = None
    k_out: torch.Tensor | None = None
    v_out: torch.Tensor | None = None


def _video_ranks_real(layout: TokenLayout, ranks: int, device) -> torch.Tensor:
    """Bool ``[Nv, ranks]``: slot (or rank) ``r`` of video block ``j`` holds a real token (``r < n_j``)."""
    valid = layout.block_valid(device)[: layout.num_video_blocks]
    return torch.arange(ranks, device=device).view(1, ranks) < valid.view(-1, 1)


def _mean_abs_deviation(x: torch.Tensor, mean: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``mean_{real u in block} |x_u - mean_block|`` for the video blocks -> float32 ``[B, H, Nv, D]``."""
    b, _, h, d = x.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    xv = x[:, : nv * bs].reshape(b, nv, bs, h, d).to(torch.float32)
    valid = layout.block_valid(x.device)[:nv].to(torch.float32)
    real = _video_ranks_real(layout, bs, x.device).to(torch.float32)  # [Nv, Bs]
    dev = (xv - mean.permute(0, 2, 1, 3).unsqueeze(2)).abs_()  # [B, Nv, Bs, H, D]
    dev = torch.einsum("bnshd,ns->bhnd", dev, real)
    return dev / valid.view(1, 1, nv, 1)


def _block_outliers(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, layout: TokenLayout, m: int):
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


def block_statistics(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor | None,
                     layout: TokenLayout, *, deviations: bool = True, outliers: int = 0) -> BlockStatistics:
    """Pooled block statistics of permuted q, k, v (§4.2, §4.5).

    Args:
        q_perm, k_perm, v_perm (`torch.Tensor`, ``[B, P, H, D]``): permuted by ``layout`` (zeros in padding slots).
            ``v_perm`` may be None when only the selection is needed.
        layout (`TokenLayout`): the layout the tensors were permuted with.
        deviations (`bool`, defaults to True): also compute the GAPR deviations ``q_dev``, ``k_dev``.
        outliers (`int`, defaults to 0): also compute ``k_out``, ``v_out``, the ``outliers`` most deviating keys
            of each block (``row_outliers``; needs ``v_perm``); 0 computes none (``True`` counts as 1).

    Returns:
        `BlockStatistics` (float32). Means divide by the true token count of each block (``block_valid``); the
        deviations average ``|x_u - x̄|`` over real tokens only, so padding slots never enter.
    """
    check_permuted(q_perm, layout, "q_perm")
    check_permuted(k_perm, layout, "k_perm")
    if v_perm is not None:
        check_permuted(v_perm, layout, "v_perm")
    if q_perm.shape[:3] != k_perm.shape[:3] or q_perm.shape[-1] != k_perm.shape[-1]:
        raise ValueError(f"q_perm {tuple(q_perm.shape)} and k_perm {tuple(k_perm.shape)} must share [B, P, H, D].")
    nv, bs, nt = layout.num_video_blocks, layout.block_size, layout.text_tokens
    q_mean = pool_blocks(q_perm, layout)[:, :, :nv]
    k_mean = pool_blocks(k_perm, layout)[:, :, :nv]
    v_mean = None if v_perm is None else pool_blocks(v_perm, layout)[:, :, :nv]
    k_text = k_perm[:, nv * bs: nv * bs + nt].to(torch.float32).transpose(1, 2)  # [B, H, Nt, D]
    counts = layout.block_valid(q_perm.device)[:nv].to(torch.float32)
    q_dev = k_dev = None
    if deviations:
        q_dev = _mean_abs_deviation(q_perm, q_mean, layout)
        k_dev = _mean_abs_deviation(k_perm, k_mean, layout)
    k_out = v_out = None
    if not isinstance(outliers, int) or outliers < 0:
        raise ValueError(f"block_statistics(outliers=...) must be an int >= 0 (exact keys per block), got "
                         f"{outliers!r}.")
    if outliers:
        if v_perm is None:
            raise ValueError("block_statistics(outliers=M) needs v_perm (the outliers carry their values).")
        k_out, v_out = _block_outliers(k_perm, v_perm, k_mean, layout, int(outliers))
    return BlockStatistics(q_mean, k_mean, v_mean, k_text, counts, q_dev, k_dev, k_out, v_out)


# ---------------------------------------------------------------------------------------------------- IPAR
def ipar_probabilities(stats: BlockStatistics, scale: float) -> torch.Tensor:
    r"""IPAR implicit full attention ``P̃`` (§4.3) -> float32 ``[B, H, Nv, Nv + 1]``.

    For video query block ``i``, the keys are the pooled video blocks ``k̄_j`` plus every valid text token ``k_τ``
    un-pooled; ``P = softmax(q̄_i · key * scale)`` over these ``Nv + Nt`` entries. With ``n_j`` the true token
    count of block ``j``::

        P̃_ij    = n_j P_ij / (Σ_j n_j P_ij + Σ_τ P_iτ)          (video block j; column j)
        P̃_i,txt = Σ_τ P_iτ / (Σ_j n_j P_ij + Σ_τ P_iτ)          (all text in one column; column Nv)

    computed stably as one softmax over ``[σ_ij * scale + log n_j, q̄_i · k_τ * scale]``. Without text the last
    column is 0 and the rest is the count-weighted block softmax. Rows sum to 1.

    Args:
        stats (`BlockStatistics`): from :func:`block_statistics`.
        scale (`float`): the model's softmax scale (``1 / sqrt(D)`` by default in the callers); pooled logits are
            ``σ_ij * scale`` with ``σ_ij = q̄_i · k̄_j``.
    """
    q, k = stats.q_mean, stats.k_mean
    nv = k.shape[-2]
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale + stats.counts.log().view(1, 1, 1, nv)
    if stats.k_text.shape[-2]:
        logits = torch.cat([logits, torch.matmul(q, stats.k_text.transpose(-1, -2)) * scale], dim=-1)
    prob = torch.softmax(logits, dim=-1)
    text = prob[..., nv:].sum(-1, keepdim=True)
    return torch.cat([prob[..., :nv], text], dim=-1)


# ---------------------------------------------------------------------------------------------------- GAPR
def gapr_reliable(stats: BlockStatistics) -> torch.Tensor:
    r"""GAPR reliability ``Z [B, H, Nv, Nv]`` (bool, §4.5): is the pooled estimate of (i, j) trustworthy?

    ``G_ij = |q̄_i · k̄_j|`` (gain) against ``E_ij = |a_i · k̄_j| + |q̄_i · b_j|`` (first-order pooling error), with
    ``a_i = mean_u |q_u - q̄_i|`` and ``b_j = mean_v |k_v - k̄_j|`` over real tokens. ``Z_ij = G_ij > E_ij``.
    The softmax scale cancels from the comparison.
    """
    if stats.q_dev is None or stats.k_dev is None:
        raise ValueError("gapr_reliable needs the GAPR deviations; build the statistics with "
                         "block_statistics(..., deviations=True).")
    kt = stats.k_mean.transpose(-1, -2)
    gain = torch.matmul(stats.q_mean, kt).abs()
    err = torch.matmul(stats.q_dev, kt).abs() + torch.matmul(stats.q_mean, stats.k_dev.transpose(-1, -2)).abs()
    return gain > err


# ---------------------------------------------------------------------------------------------------- selection
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
    """Critical-block selection (§4.4) from ``P̃`` -> bool block mask ``[B, H, N, N]``.

    Per (batch, head, video query block), rank the ``Nv + 1`` entries of ``P̃`` (video blocks and the collapsed
    text column, as in the reference) by descending value; exact ties rank the lower column index first (video
    blocks in tile order, then the text column). Top-p: ``n_need = #{cumsum <= top_p} + 1`` leading entries of that
    ranking (cumulative sums in float64), as in the reference. Top-k floor: at least ``top_k = config.top_k(Nv)``
    **video** blocks, the highest-ranked ones. The kept video blocks are therefore the first
    ``max(#video entries among the n_need leading entries, top_k)`` video entries of the ranking. The text column
    is always on, so unlike the reference it never takes a video block's place under the floor (otherwise
    ``sparsity=0`` would not be dense). Then OR in the tile neighbours (``config.neighbours``), the first-frame
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
        extra = neighbour_mask(layout, dev)
    if config.first_frame_dense and layout.frames > 1:
        ff = _first_frame_mask(layout, dev)
        extra = ff if extra is None else extra | ff
    if extra is not None:
        mask[:, :, :nv, :nv] |= extra
    return mask


def _check_scale(q_perm: torch.Tensor, scale: float | None) -> float:
    if scale is None:
        return 1.0 / math.sqrt(q_perm.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (the model's softmax scale), got {scale!r}.")
    return float(scale)


def _check_config(config) -> None:
    if not isinstance(config, PooledRectificationConfig):
        raise ValueError(f"config must be a PooledRectificationConfig, got {type(config).__name__}.")


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


# ---------------------------------------------------------------------------------------------------- rectification
def _normalise_mask(mask: torch.Tensor, layout: TokenLayout, device) -> torch.Tensor:
    if not torch.is_tensor(mask) or mask.dtype != torch.bool:
        got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"mask must be a torch.bool block mask [B, H, N, N], got {got}; convert with mask.bool().")
    if mask.dim() == 2:
        mask = mask[None, None]
    n = layout.num_blocks
    if mask.dim() != 4 or mask.shape[-2:] != (n, n):
        raise ValueError(f"mask must be [B, H, N={n}, N={n}] (or [N, N]) for {layout!r}, got {tuple(mask.shape)}.")
    return mask.to(device)


def rectification_terms(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                        mask: torch.Tensor, config: PooledRectificationConfig, scale: float | None = None, *,
                        stats: BlockStatistics | None = None, p_tilde: torch.Tensor | None = None,
                        reliable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rectification factor ``R`` and compensation ``c`` (§4.6) for ANY final block mask.

    For video query block ``i``: ``C_i`` = the video key blocks ``mask`` reads in row ``i``, plus the text column
    (always treated as critical: text keys are always read); ``U_i = C_i ∪ {j : Z_ij = 0}``::

        R_i = Σ_{j ∈ U_i} P̃_ij  (computed as 1 - Σ_{j ∉ U_i} P̃_ij)        c_i = Σ_{j ∉ U_i} P̃_ij v̄_j

    so exactly the skipped, reliable video blocks are compensated, and ``R = 1, c = 0`` exactly where nothing is
    (every block read, or no block reliable). Text query blocks get ``R = 1``, ``c = 0``. The output is then
    ``O_u = R_i * SparseAttn_u(C_i) + c_i``, a convex mix of sparse attention and the pooled remainder.

    Args:
        q_perm, k_perm, v_perm (`torch.Tensor`, ``[B, P, H, D]``): permuted by ``layout``.
        layout (`TokenLayout`): the layout.
        mask (`torch.Tensor`, bool ``[B, H, N, N]``, ``[1, 1, N, N]`` or ``[N, N]``): the final block mask the sparse
            kernel runs (any method's, or a union). Its text columns should be on (see :func:`forced_mask`).
        config (`PooledRectificationConfig`): ``config.gapr=False`` compensates every dropped block (naive).
        scale (`float`, *optional*): the model's softmax scale for the pooled logits, defaults to ``1 / sqrt(D)``.

    Other Parameters:
        stats (`BlockStatistics`, *optional*), p_tilde (`torch.Tensor`, *optional*): precomputed
            :func:`block_statistics` (with deviations and ``v_mean``) and :func:`ipar_probabilities`.
        reliable (`torch.Tensor`, bool ``[B|1, H|1, Nv, Nv]``, *optional*): override ``Z`` (ablations and tests;
            used whatever ``config.gapr`` says). All False gives exactly ``R = 1, c = 0`` (plain sparse attention).

    Returns:
        ``R`` float32 ``[B, H, N]`` and ``c`` float32 ``[B, H, N, D]`` (per query block).
    """
    _check_config(config)
    scale = _check_scale(q_perm, scale)
    need_dev = config.gapr and reliable is None
    if stats is None:
        stats = block_statistics(q_perm, k_perm, v_perm, layout, deviations=need_dev)
    if stats.v_mean is None:
        raise ValueError("rectification_terms needs v_mean in stats; build them with block_statistics(q, k, v, ...).")
    if p_tilde is None:
        p_tilde = ipar_probabilities(stats, scale)
    b, h, nv, d = stats.v_mean.shape
    n = layout.num_blocks
    mask = _normalise_mask(mask, layout, p_tilde.device)
    critical = mask[..., :nv, :nv].expand(b, h, nv, nv)
    if reliable is not None:
        if not torch.is_tensor(reliable) or reliable.dtype != torch.bool or reliable.dim() != 4 \
                or reliable.shape[-2:] != (nv, nv):
            got = tuple(reliable.shape) if torch.is_tensor(reliable) else type(reliable).__name__
            raise ValueError(f"reliable must be a bool [B, H, Nv={nv}, Nv={nv}] tensor, got {got}.")
        compensate = ~critical & reliable.to(p_tilde.device)
    elif config.gapr:
        compensate = ~critical & gapr_reliable(stats)
    else:
        compensate = ~critical
    weights = p_tilde[..., :nv] * compensate  # [B, H, Nv, Nv]: exactly the skipped, reliable blocks
    r = torch.ones(b, h, n, dtype=torch.float32, device=p_tilde.device)
    c = torch.zeros(b, h, n, d, dtype=torch.float32, device=p_tilde.device)
    r[..., :nv] = 1.0 - weights.sum(-1)
    c[..., :nv, :] = torch.matmul(weights, stats.v_mean)
    return r, c


def rectified_plan(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                   config: PooledRectificationConfig | None = None, scale: float | None = None,
                   mask: torch.Tensor | None = None) -> SparsePlan:
    """A :class:`~dit_sparse.SparsePlan` for Rectified SpaAttn: selection plus the ``(R, c)`` epilogue.

    Args:
        q_perm, k_perm, v_perm (`torch.Tensor`, ``[B, P, H, D]``): permuted by ``layout``.
        layout (`TokenLayout`): the layout.
        config (`PooledRectificationConfig`, *optional*): defaults to ``PooledRectificationConfig()``.
        scale (`float`, *optional*): the model's softmax scale, defaults to ``1 / sqrt(D)``.
        mask (`torch.Tensor`, bool ``[B, H, N, N]`` or ``[N, N]``, *optional*): use this block mask (for example a
            draft or neighbourhood mask, or a union) instead of the Rectified selection; text rows and columns are
            forced on. The rectification terms are computed for exactly this mask.

    Returns:
        `SparsePlan` over the permuted sequence (``seq = layout.padded_len``) with ``out_scale = R [B, H, N]`` and
        ``out_bias = c.transpose(1, 2) [B, N, H, D]`` per query block (no epilogue when ``config.rectify`` is
        False). ``plan.density`` reports the achieved density.
    """
    config = PooledRectificationConfig() if config is None else config
    _check_config(config)
    if config.per_row:
        raise ValueError("rectified_plan: combine='row' reads a pooled key segment in the kernel's softmax, which a "
                         "SparsePlan epilogue (per query block) cannot hold. Use rectified_attention(...) (or the "
                         "composite SparseAttention, or pooled_segment(...) with block_sparse_attention(..., "
                         "pooled=...)), or PooledRectificationConfig(combine='block').")
    scale = _check_scale(q_perm, scale)
    stats, p_tilde, mask = _stats_and_mask(q_perm, k_perm, v_perm, layout, config, scale, mask)
    plan = plan_from_mask(mask, layout)
    if not config.rectify:
        return plan
    r, c = rectification_terms(q_perm, k_perm, v_perm, layout, mask, config, scale, stats=stats, p_tilde=p_tilde)
    return plan.with_epilogue(out_scale=r, out_bias=c.transpose(1, 2))


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


def rectified_attention(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                        config: PooledRectificationConfig | None = None, scale: float | None = None,
                        mask: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Rectified sparse attention on permuted ``[B, P, H, D]`` tensors, in either ``config.combine`` mode.

    ``"block"``: :func:`rectified_plan` through :func:`~dit_sparse.block_sparse_attention` (the epilogue runs in
    the kernel). ``"row"``: the plain sparse plan with ``return_lse=True``, then :func:`merge_partials` with
    :func:`pooled_remainder`. ``mask`` as in :func:`rectified_plan`; ``backend`` as in the op. Returns the
    permuted output ``[B, P, H, D]`` in the input dtype.
    """
    config = PooledRectificationConfig() if config is None else config
    _check_config(config)
    if not config.per_row:
        plan = rectified_plan(q_perm, k_perm, v_perm, layout, config, scale, mask)
        return block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, backend=backend)
    scale = _check_scale(q_perm, scale)
    stats, _, mask = _stats_and_mask(q_perm, k_perm, v_perm, layout, config, scale, mask)
    return row_rectified_attention(q_perm, k_perm, v_perm, layout, mask, config, scale, stats=stats,
                                   backend=backend)


def row_rectified_attention(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                            mask: torch.Tensor, config: PooledRectificationConfig, scale: float | None = None, *,
                            stats: BlockStatistics, backend: str | None = None, two_pass: bool = False,
                            return_lse: bool = False):
    """The ``combine="row"`` path for a final block ``mask``, in ONE pass: the plain sparse plan with the pooled
    key segment of :func:`pooled_segment` (the skipped, reliable video blocks) read in the same softmax.

    ``two_pass=True`` runs the earlier form instead (kept as a cross-check): the plain sparse plan with
    ``return_lse=True``, merged by :func:`merge_partials` with :func:`pooled_remainder`; both give the same
    ``(out, lse)`` within float round-off. ``stats`` as :func:`pooled_segment` needs them. Returns the permuted
    output ``[B, P, H, D]`` in the input dtype (and the float32 ``lse [B, H, P]`` when ``return_lse``).
    """
    plan = plan_from_mask(mask, layout)
    if two_pass and config.row_keys != "mean":
        raise ValueError("row_rectified_attention(two_pass=True) is the cross-check of row_keys='mean' only; use the "
                         "one-pass form for row_keys='outlier'.")
    if two_pass:
        out, lse = block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, return_lse=True,
                                          backend=backend)
        r_out, r_lse = pooled_remainder(q_perm, layout, mask, config, scale, stats=stats)
        merged = merge_partials(out, lse, r_out, r_lse)
        return (merged, torch.logaddexp(lse, r_lse)) if return_lse else merged
    seg = pooled_segment(layout, mask, config, stats=stats, device=q_perm.device)
    return block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, return_lse=return_lse,
                                  backend=backend, pooled=seg)


def pooled_segment(layout: TokenLayout, mask: torch.Tensor, config: PooledRectificationConfig, *,
                   stats: BlockStatistics, device=None) -> PooledSegment:
    """The pooled key segment of the per-row combine (§4.6b) for a final block ``mask``.

    One pooled key per video block (true-count mean key ``k̄_j`` and value ``v̄_j``, logit bias ``log n_j``); the
    rows of video query block ``i`` read the blocks ``mask`` skips in row ``i``; text query rows read none. With
    ``config.gapr`` the per-row gate ``|q_u · k̄_j| > |q_u · b_j|`` applies (``b_j`` = ``stats.k_dev``).
    Same remainder as :func:`pooled_remainder`, read inside the kernel's softmax. With ``config.row_keys =
    "outlier"`` (``M = config.row_outliers``): ``(M + 1) Nv`` keys, rank-major (key ``r Nv + j`` is block ``j``'s
    rank-``r`` outlier, exact, bias 0; keys ``M Nv + j`` the mean of its other ``n_j - M`` tokens, bias
    ``log(n_j - M)``); the read mask repeats per rank, a rank ``r >= n_j`` and the pooled key of a block with
    ``n_j <= M`` are never read; no gate.
    """
    _check_config(config)
    outlier = config.row_keys == "outlier"
    m = config.row_outliers
    if stats.v_mean is None or (config.gapr and not outlier and stats.k_dev is None) \
            or (outlier and stats.k_out is None):
        raise ValueError("pooled_segment needs v_mean (k_dev with gapr=True, k_out / v_out with "
                         "row_keys='outlier') in stats; build them with block_statistics(q, k, v, layout, "
                         "outliers=config.row_outliers).")
    if outlier and stats.k_out.shape[3] != m:
        raise ValueError(f"pooled_segment: stats hold {stats.k_out.shape[3]} outliers per block, config.row_outliers "
                         f"is {m}; build them with block_statistics(..., outliers={m}).")
    device = stats.k_mean.device if device is None else device
    nv, n = layout.num_video_blocks, layout.num_blocks
    mask = _normalise_mask(mask, layout, device)
    skipped = torch.zeros(*mask.shape[:2], n, nv, dtype=torch.bool, device=device)
    skipped[:, :, :nv] = ~mask[:, :, :nv, :nv]
    if not outlier:
        return PooledSegment(keys=stats.k_mean, values=stats.v_mean, log_count=stats.counts.log(), read=skipped,
                             gate=stats.k_dev if config.gapr else None)
    # the M outliers exactly (weight 1), then the mean of the other n_j - M tokens (none when n_j <= M)
    b, h = stats.k_out.shape[:2]
    n_j = stats.counts.view(1, 1, nv, 1)
    rest = (n_j > m).view(nv)
    denom = (n_j - m).clamp_min(1.0)
    k_rest = (stats.k_mean * n_j - stats.k_out.sum(3)) / denom
    v_rest = (stats.v_mean * n_j - stats.v_out.sum(3)) / denom
    k_exact = stats.k_out.transpose(2, 3).reshape(b, h, m * nv, -1)  # rank-major: [r * Nv + j]
    v_exact = stats.v_out.transpose(2, 3).reshape(b, h, m * nv, -1)
    rank_real = (torch.arange(m, device=stats.counts.device).view(m, 1) < stats.counts.view(1, nv)).reshape(m * nv)
    return PooledSegment(keys=torch.cat([k_exact, k_rest], 2), values=torch.cat([v_exact, v_rest], 2),
                         log_count=torch.cat([stats.counts.new_zeros(m * nv),
                                              (stats.counts - m).clamp_min(1).log()]),
                         read=torch.cat([skipped.repeat(1, 1, 1, m) & rank_real.view(1, 1, 1, m * nv),
                                         skipped & rest.view(1, 1, 1, nv)], -1))


def row_outlier_count(config: PooledRectificationConfig) -> int:
    """How many outliers per block :func:`block_statistics` must compute for ``config`` (0 unless row mode with
    ``row_keys="outlier"``)."""
    return config.row_outliers if config.per_row and config.row_keys == "outlier" else 0


# ---------------------------------------------------------------------------------------------------- per-row merge
def pooled_remainder(q_perm: torch.Tensor, layout: TokenLayout, mask: torch.Tensor,
                     config: PooledRectificationConfig, scale: float | None = None, *,
                     stats: BlockStatistics) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row pooled attention over the skipped, reliable video blocks (``combine="row"``).

    For video query row ``u`` of block ``i`` and every video key block ``j`` that ``mask`` does not read in row
    ``i`` and whose pooled estimate is reliable for ``u`` (``config.gapr``: ``|q_u · k̄_j| > |q_u · b_j|``; a
    single query token has no query deviation)::

        ℓ_uj = q_u · k̄_j * scale + log n_j        lse_u = logsumexp_j ℓ_uj        out_u = Σ_j softmax(ℓ_u)_j v̄_j

    i.e. the skipped block stands in as ``n_j`` copies of its mean key and value. Merged with the exact sparse
    attention by :func:`merge_partials`, this is one softmax over the exact read keys and the pooled skipped
    blocks. Rows with nothing to compensate (text rows, padding slots, fully read rows) get ``lse = -inf`` and
    ``out = 0``. Chunked over heads so the ``[B, h, Pv, Nv]`` logits stay bounded.

    Args:
        q_perm (`torch.Tensor`, ``[B, P, H, D]``): permuted queries.
        layout (`TokenLayout`), mask (`torch.Tensor`, bool ``[B|1, H|1, N, N]`` or ``[N, N]``): the block mask the
            sparse kernel runs. config (`PooledRectificationConfig`), scale (`float`, *optional*).
        stats (`BlockStatistics`): from :func:`block_statistics` with ``v_perm`` (and deviations when
            ``config.gapr``).

    Returns:
        ``out`` float32 ``[B, P, H, D]`` and ``lse`` float32 ``[B, H, P]``.
    """
    _check_config(config)
    check_permuted(q_perm, layout, "q_perm")
    scale = _check_scale(q_perm, scale)
    if stats.v_mean is None or (config.gapr and stats.k_dev is None):
        raise ValueError("pooled_remainder needs v_mean (and k_dev with gapr=True) in stats; build them with "
                         "block_statistics(q, k, v, layout).")
    b, p, h, d = q_perm.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    mask = _normalise_mask(mask, layout, q_perm.device)[..., :nv, :nv]
    out = torch.zeros(b, h, p, d, dtype=torch.float32, device=q_perm.device)
    lse = torch.full((b, h, p), float("-inf"), dtype=torch.float32, device=q_perm.device)
    log_n = stats.counts.log().view(1, 1, 1, nv)
    step = max(1, _ROW_CHUNK // max(1, b * nv * bs * nv))
    for h0 in range(0, h, step):
        hs = slice(h0, min(h, h0 + step))
        q = q_perm[:, : nv * bs, hs].to(torch.float32).transpose(1, 2)  # [B, h, Pv, D]
        k_mean = stats.k_mean[:, hs]
        dots = torch.matmul(q, k_mean.transpose(-1, -2))  # [B, h, Pv, Nv]
        skipped = ~mask[:, hs if mask.shape[1] > 1 else slice(None)].repeat_interleave(bs, dim=-2)
        if config.gapr:
            skipped = skipped & (dots.abs() > torch.matmul(q, stats.k_dev[:, hs].transpose(-1, -2)).abs())
        logits = (dots * scale + log_n).masked_fill(~skipped, float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - row_lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        out[:, hs, : nv * bs] = torch.matmul(weights, stats.v_mean[:, hs])
        lse[:, hs, : nv * bs] = row_lse
    return out.transpose(1, 2), lse


def merge_partials(out: torch.Tensor, lse: torch.Tensor, other_out: torch.Tensor,
                   other_lse: torch.Tensor) -> torch.Tensor:
    """Merge two partial softmax attentions over disjoint key sets by their log-sum-exps.

    ``out [B, S, H, D]`` with ``lse [B, H, S]`` and ``other_out`` / ``other_lse`` alike ->
    ``(e^lse out + e^other_lse other_out) / (e^lse + e^other_lse)`` in ``out.dtype`` (computed in float32).
    A row where one side is ``-inf`` takes the other side as is; a row where both are takes ``out``.
    """
    both_empty = torch.isneginf(lse) & torch.isneginf(other_lse)
    total = torch.logaddexp(lse, other_lse).masked_fill(both_empty, 0.0)  # finite wherever a side has mass
    w_a = torch.exp(lse - total).masked_fill(both_empty, 1.0)
    w_b = torch.exp(other_lse - total)  # 0 where other_lse = -inf (both_empty included)
    merged = w_a.transpose(1, 2).unsqueeze(-1) * out.to(torch.float32) \
        + w_b.transpose(1, 2).unsqueeze(-1) * other_out.to(torch.float32)
    return merged.to(out.dtype)
