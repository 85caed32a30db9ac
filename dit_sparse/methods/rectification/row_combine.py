"""The ``combine="row"`` correction of pooled rectification: the skipped blocks as pooled (and, with
``row_keys="outlier"``, exact) keys in each query row's softmax, read by the kernel in one pass
(:func:`pooled_segment`), and the two-pass LSE merge kept as its cross-check (:func:`pooled_remainder`,
:func:`merge_partials`)."""

from __future__ import annotations

import torch

from ...layout import TokenLayout
from ...ops import block_sparse_attention
from ...segment import PooledSegment
from ..base import check_permuted, plan_from_mask
from .config import PooledRectificationConfig, _check_config, _check_scale, _normalise_mask
from .statistics import BlockStatistics, outlier_keys

__all__ = ["merge_partials", "pooled_remainder", "pooled_segment", "row_rectified_attention"]

#: elements of one chunk of per-row pooled logits ``[B, h, Pv, Nv]`` in :func:`pooled_remainder`
_ROW_CHUNK = 1 << 24


def row_rectified_attention(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                            mask: torch.Tensor, config: PooledRectificationConfig, scale: float | None = None, *,
                            stats: BlockStatistics, backend: str | None = None, two_pass: bool = False,
                            return_lse: bool = False):
    """The ``combine="row"`` path for a final block ``mask``, in ONE pass: the plain sparse plan with the pooled
    key segment of :func:`pooled_segment` (the skipped, reliable video blocks) read in the same softmax.

    ``two_pass=True`` runs the two-pass form instead (a cross-check): the plain sparse plan with
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
    """The pooled key segment of the per-row combine (docs/rectification.md#row-combine) for a final block ``mask``.

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
    m = outlier_keys(config)
    outlier = m > 0
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
