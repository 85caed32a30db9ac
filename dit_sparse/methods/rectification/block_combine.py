"""The ``combine="block"`` correction of pooled rectification: the per-query-block factor ``R`` and
compensation ``c`` for any final block mask, carried by the plan's epilogue."""

from __future__ import annotations

import torch

from ...layout import TokenLayout
from ...plan import SparsePlan
from ..base import plan_from_mask
from .config import PooledRectificationConfig, _check_config, _check_scale, _normalise_mask
from .selection import _stats_and_mask
from .statistics import BlockStatistics, block_statistics, gapr_reliable, ipar_probabilities

__all__ = ["rectification_terms", "rectified_plan"]


def rectification_terms(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout,
                        mask: torch.Tensor, config: PooledRectificationConfig, scale: float | None = None, *,
                        stats: BlockStatistics | None = None, p_tilde: torch.Tensor | None = None,
                        reliable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rectification factor ``R`` and compensation ``c`` (docs/rectification.md#block-combine) for ANY final
    block mask.

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
