"""The plan's output epilogue ``out_scale * out + out_bias``, for the backends that apply it after the attention.

The Triton kernels fuse it; the dense, flex and FA4 backends and the torch reference call :func:`apply_epilogue`.
Shapes are those of :class:`~dit_sparse.plan.SparsePlan`: ``out_scale`` ``[B|1, H|1, seq_q or num_q_blocks]``,
``out_bias`` ``[B|1, seq_q or num_q_blocks, H|1, D]``.
"""

from __future__ import annotations

import torch

from .plan import SparsePlan

__all__ = ["expand_epilogue", "apply_epilogue"]


def expand_epilogue(plan: SparsePlan, batch: int, heads: int, dtype: torch.dtype):
    """Epilogue terms as per-row tensors: scale ``[B, H, seq_q]`` and bias ``[B, seq_q, H, D]`` (or None)."""
    scale = bias = None
    if plan.out_scale is not None:
        scale = plan.out_scale.to(dtype)
        if plan.scale_per_block:
            scale = scale.repeat_interleave(plan.block_q, dim=-1)[..., : plan.seq_q]
        scale = scale.expand(batch, heads, plan.seq_q)
    if plan.out_bias is not None:
        bias = plan.out_bias.to(dtype)
        if plan.bias_per_block:
            bias = bias.repeat_interleave(plan.block_q, dim=1)[:, : plan.seq_q]
        bias = bias.expand(batch, plan.seq_q, heads, bias.shape[-1])
    return scale, bias


def apply_epilogue(out: torch.Tensor, plan: SparsePlan) -> torch.Tensor:
    """``out_scale * out + out_bias`` on a ``[B, seq_q, H, D]`` tensor (computation dtype of ``out``)."""
    b, _, h, _ = out.shape
    scale, bias = expand_epilogue(plan, b, h, out.dtype)
    if scale is not None:
        out = out * scale.transpose(1, 2).unsqueeze(-1)
    if bias is not None:
        out = out + bias
    return out
