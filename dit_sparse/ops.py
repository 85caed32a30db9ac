"""Public attention ops: validation, dispatch, documentation. Kernels live in ``dit_sparse.kernels``."""

from __future__ import annotations

import math

import torch

from ._env import checks_enabled
from .backends import AttentionInputs, choose_backend
from .plan import SparsePlan
from .segment import PooledSegment

__all__ = ["block_sparse_attention", "dense_attention_lse"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(query, key, value, plan) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(t):
            raise ValueError(f"{name} must be a torch.Tensor [B, S, H, D], got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, S, H, D] (diffusers processor layout), got shape "
                             f"{tuple(t.shape)}; SDPA-layout tensors [B, H, S, D] pass as x.transpose(1, 2).")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; expected one of float16, bfloat16, "
                             f"float32, float64. Cast with {name}.to(torch.bfloat16).")
    if not isinstance(plan, SparsePlan):
        raise ValueError(f"plan must be a dit_sparse.SparsePlan, got {type(plan).__name__}; build one with "
                         "SparsePlan.from_dense(mask, block_q=..., block_k=...).")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}; cast them to the same dtype.")
    if not (query.device == key.device == value.device == plan.device):
        raise ValueError(f"query, key, value and plan must be on one device, got {query.device}, {key.device}, "
                         f"{value.device} and plan on {plan.device}; use plan.to(query.device).")
    b, sq, h, d = query.shape
    if key.shape[0] != b or key.shape[2] != h or key.shape[3] != d or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"Shape mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}; expected key [B={b}, S_k, H={h}, D={d}] and value [B, S_k, H, D_v].")
    if sq != plan.seq_q or key.shape[1] != plan.seq_k:
        raise ValueError(f"The plan was built for seq_q={plan.seq_q}, seq_k={plan.seq_k} but got seq_q={sq}, "
                         f"seq_k={key.shape[1]}; build a new plan for these lengths (TokenLayout.padded_len).")
    pb, ph = plan.kv_num_blocks.shape[:2]
    if pb not in (1, b) or ph not in (1, h):
        raise ValueError(f"The plan has batch={pb}, heads={ph}; it cannot serve batch={b}, heads={h}. Build it "
                         "for these sizes, or with size 1 to broadcast.")
    for name, t, axis_b, axis_h in (("out_scale", plan.out_scale, 0, 1), ("out_bias", plan.out_bias, 0, 2)):
        if t is not None and (t.shape[axis_b] not in (1, b) or t.shape[axis_h] not in (1, h)):
            raise ValueError(f"plan.{name} has shape {tuple(t.shape)}, which does not broadcast to batch={b}, "
                             f"heads={h}.")
    if plan.out_bias is not None and plan.out_bias.shape[-1] != value.shape[-1]:
        raise ValueError(f"plan.out_bias has head_dim {plan.out_bias.shape[-1]}, value has {value.shape[-1]}.")
    if checks_enabled():
        plan.validate()


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: SparsePlan, *,
                           scale: float | None = None, return_lse: bool = False, backend: str | None = None,
                           pooled: PooledSegment | None = None):
    r"""Attention restricted to the key blocks of ``plan``, with the plan's optional epilogue.

    ``out = out_scale * softmax(query @ key.T * scale, restricted to the plan) @ value + out_bias``

    Args:
        query (`torch.Tensor`): ``[B, S_q, H, D]`` (diffusers processor layout; any strides: the Triton backend
            copies an input whose last dim is not unit-stride).
        key (`torch.Tensor`): ``[B, S_k, H, D]``.
        value (`torch.Tensor`): ``[B, S_k, H, D]``.
        plan (`SparsePlan`): built for ``seq_q = S_q`` and ``seq_k = S_k``; batch/head dims 1 or B/H.
        scale (`float`, *optional*): softmax scale, defaults to ``1 / sqrt(D)``.
        return_lse (`bool`, defaults to False): also return the natural-log log-sum-exp ``[B, H, S_q]`` float32
            over the keys read (``-inf`` for rows that read none).

    Other Parameters:
        backend (`str`, *optional*): ``"hopper"``, ``"triton"``, ``"torch"``, ``"flex"``, ``"sdpa"``,
            ``"xformers"``, ``"fa4"`` (flash-attn-4; only when named), ``"compiled"`` (torch.compile of flex with the
            pooled segment; any device inductor targets) or None (automatic: SDPA for all-dense plans,
            then the Hopper kernel on sm90+ GPUs, then the portable Triton kernel on CUDA, then flex on CUDA, then
            ``compiled`` on CPU from the measured break-even, then the torch reference). A named backend that
            cannot run raises ``NotImplementedError`` listing why.

    Returns:
        ``out [B, S_q, H, D]`` in the input dtype, or ``(out, lse)``.

    Rows that read no key return exactly ``out_bias`` (zero without one) and ``lse = -inf``, never NaN.

    Checks: shapes, dtypes, devices and the plan's table widths on every call (no device sync); the plan's
    values (:meth:`SparsePlan.validate`) only with ``DIT_SPARSE_CHECKS=1``. Without them a malformed plan is read
    by the rule of :mod:`dit_sparse.plan` (clamped counts, out-of-range and repeated indices skipped) on every
    backend, never out of bounds.

    Example::

        plan = SparsePlan.from_dense(block_mask, block_q=128, block_k=128, seq_q=S, seq_k=S)
        out = dit_sparse.block_sparse_attention(q, k, v, plan)
    """
    _validate(query, key, value, plan)
    if pooled is not None:
        if not isinstance(pooled, PooledSegment):
            raise ValueError(f"pooled must be a dit_sparse.segment.PooledSegment, got {type(pooled).__name__}.")
        b, _, h, d = query.shape
        pooled.check_against(b, h, d, value.shape[-1], plan.num_q_blocks, query.device)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    inputs = AttentionInputs(query, key, value, plan, scale, return_lse, pooled)
    out, lse = choose_backend(inputs, backend).forward(inputs)
    return (out, lse) if return_lse else out


def dense_attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: float | None = None, block_q: int = 128, block_k: int = 128,
                        kv_block_valid: torch.Tensor | None = None, backend: str | None = None):
    """Dense attention with its log-sum-exp, from the same numerics as the sparse op (for temporal reuse).

    Returns ``(out [B, S_q, H, D], lse [B, H, S_q] float32)``. ``kv_block_valid`` masks padding slots of a
    permuted (:class:`~dit_sparse.TokenLayout`) key sequence.
    """
    plan = SparsePlan.dense(seq_q=query.shape[1], seq_k=key.shape[1], block_q=block_q, block_k=block_k,
                            device=query.device, kv_block_valid=kv_block_valid)
    return block_sparse_attention(query, key, value, plan, scale=scale, return_lse=True, backend=backend)
