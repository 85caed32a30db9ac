"""Pooled block statistics, IPAR probabilities and GAPR reliability of pooled rectification, and the statistics
one attention call needs under a config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...layout import TokenLayout
from ..base import check_permuted, pool_blocks
from .config import PooledRectificationConfig

__all__ = ["BlockStatistics", "CallStatistics", "block_statistics", "gapr_reliable", "ipar_probabilities",
           "outlier_keys", "row_outlier_count"]


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


#: float32 elements of one chunk of a ``[B, c, Bs, H, D]`` per-token temporary in the statistics (4 MiB): the
#: elementwise terms are computed a few video blocks at a time, so no temporary as large as the input is allocated
#: (at 119k tokens a full one is hundreds of MB, and allocating it costs more than the arithmetic).
STAT_CHUNK = 1 << 20


def _block_chunks(nv: int, per_block: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of video blocks whose per-token temporaries hold about :data:`STAT_CHUNK` elements.

    Every range holds at least 2 blocks (unless ``nv`` is 1): ``einsum`` contracts a block dimension of size 1 by
    another kernel (a matrix-vector product, other rounding), while for 2 or more blocks it runs the same per-block
    product as on the whole tensor, so each block's value is the same bits whatever the chunking.
    """
    step = max(2, STAT_CHUNK // max(1, per_block))
    starts = list(range(0, nv, step))
    if len(starts) > 1 and nv - starts[-1] < 2:  # a last range of one block joins the one before
        starts.pop()
    return [(j, starts[i + 1] if i + 1 < len(starts) else nv) for i, j in enumerate(starts)]


def _mean_abs_deviation(x: torch.Tensor, mean: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``mean_{real u in block} |x_u - mean_block|`` for the video blocks -> float32 ``[B, H, Nv, D]``."""
    b, _, h, d = x.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    xv = x[:, : nv * bs].reshape(b, nv, bs, h, d)
    valid = layout.block_valid(x.device)[:nv].to(torch.float32)
    real = _video_ranks_real(layout, bs, x.device).to(torch.float32)  # [Nv, Bs]
    mean_t = mean.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Nv, 1, H, D]
    dev = torch.empty(b, h, nv, d, dtype=torch.float32, device=x.device)
    for j0, j1 in _block_chunks(nv, b * bs * h * d):
        part = (xv[:, j0:j1].to(torch.float32) - mean_t[:, j0:j1]).abs_()  # [B, c, Bs, H, D]
        dev[:, :, j0:j1] = torch.einsum("bnshd,ns->bhnd", part, real[j0:j1])
    return dev / valid.view(1, 1, nv, 1)


def _block_outliers(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor, layout: TokenLayout, m: int):
    """The ``m`` most deviating real keys of each video block (largest ``||k_t - k̄_j||`` first, lowest slot among
    exact ties) and their values -> float32 ``[B, H, Nv, m, D]`` twice (zeros at ranks ``>= n_j``)."""
    b, _, h, d = k.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    kv = k[:, : nv * bs].reshape(b, nv, bs, h, d)
    vv = v[:, : nv * bs].reshape(b, nv, bs, h, -1)
    mean_t = k_mean.permute(0, 2, 1, 3).unsqueeze(2)  # [B, Nv, 1, H, D]
    dist = torch.empty(b, nv, bs, h, dtype=torch.float32, device=k.device)
    for j0, j1 in _block_chunks(nv, b * bs * h * d):
        dist[:, j0:j1] = (kv[:, j0:j1].to(torch.float32) - mean_t[:, j0:j1]).square_().sum(-1)  # [B, c, Bs, H]
    real = _video_ranks_real(layout, bs, k.device)
    dist = dist.masked_fill_(~real.view(1, nv, bs, 1), -1.0)
    # a stable descending sort keeps equal distances in slot order: the lowest slot first among exact ties;
    # padding slots (-1) sort after every real key
    mm = min(m, bs)  # ranks past the block size hold no token (zeros below, never read)
    idx = torch.sort(dist, dim=2, descending=True, stable=True).indices[:, :, :mm]  # [B, Nv, mm, H]
    keep = _video_ranks_real(layout, mm, k.device).view(1, nv, mm, 1, 1).to(torch.float32)
    # gather the few outliers from the input (any dtype), then convert: the same values as converting first
    k_out = kv.gather(2, idx.unsqueeze(-1).expand(b, nv, mm, h, d)).to(torch.float32) * keep
    v_out = vv.gather(2, idx.unsqueeze(-1).expand(b, nv, mm, h, vv.shape[-1])).to(torch.float32) * keep
    if mm < m:
        k_out = torch.cat([k_out, k_out.new_zeros(b, nv, m - mm, h, d)], 2)
        v_out = torch.cat([v_out, v_out.new_zeros(b, nv, m - mm, h, vv.shape[-1])], 2)
    return k_out.permute(0, 3, 1, 2, 4).contiguous(), v_out.permute(0, 3, 1, 2, 4).contiguous()


def block_statistics(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor | None,
                     layout: TokenLayout, *, deviations: bool = True, outliers: int = 0) -> BlockStatistics:
    """Pooled block statistics of permuted q, k, v (docs/rectification.md#block-pooling, docs/rectification.md#gapr).

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


def ipar_probabilities(stats: BlockStatistics, scale: float) -> torch.Tensor:
    r"""IPAR implicit full attention ``P̃`` (docs/rectification.md#ipar) -> float32 ``[B, H, Nv, Nv + 1]``.

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


def gapr_reliable(stats: BlockStatistics) -> torch.Tensor:
    r"""GAPR reliability ``Z [B, H, Nv, Nv]`` (bool, docs/rectification.md#gapr): is the pooled estimate of
    (i, j) trustworthy?

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


def outlier_keys(config: PooledRectificationConfig) -> int:
    """Exact keys per skipped block in the per-row segment of ``config``: ``config.row_outliers`` with
    ``row_keys="outlier"``, else 0. The statistics (:func:`row_outlier_count`) and the segment
    (:func:`~dit_sparse.methods.rectification.row_combine.pooled_segment`) both take the count from here."""
    return config.row_outliers if config.row_keys == "outlier" else 0


def row_outlier_count(config: PooledRectificationConfig) -> int:
    """How many outliers per block :func:`block_statistics` must compute for ``config`` (0 unless row mode with
    ``row_keys="outlier"``)."""
    return outlier_keys(config) if config.per_row else 0


class CallStatistics:
    """Pooled statistics and IPAR probabilities of one attention call under ``config``, computed on first use and
    shared by the selection, the block epilogue and the per-row segment of that call.

    Calling the object returns ``(BlockStatistics, P̃)``: :func:`block_statistics` (with deviations, and the
    :func:`row_outlier_count` outliers of ``config``) and :func:`ipar_probabilities` at ``scale``. ``v_perm``
    None: statistics for the selection only (no values, no outliers). ``scale`` defaults to ``1 / sqrt(D)``.
    """

    def __init__(self, q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor | None,
                 layout: TokenLayout, config: PooledRectificationConfig, scale: float | None = None):
        self.args = (q_perm, k_perm, v_perm, layout)
        self.scale = 1.0 / math.sqrt(q_perm.shape[-1]) if scale is None else float(scale)
        self.outliers = row_outlier_count(config) if v_perm is not None else 0
        self._value = None

    def __call__(self) -> tuple[BlockStatistics, torch.Tensor]:
        if self._value is None:
            stats = block_statistics(*self.args, outliers=self.outliers)
            self._value = (stats, ipar_probabilities(stats, self.scale))
        return self._value
