"""The ``triton`` backend: the block-sparse FlashAttention kernel, registered as a ``torch.library`` custom op.

The custom op (with a fake twin) keeps ``torch.compile`` graphs whole around the kernel. On CPU the kernel runs
in Triton's interpreter when ``TRITON_INTERPRET=1``; automatic dispatch never picks that (it is for tests).
"""

from __future__ import annotations

import torch

from .._env import has_triton, triton_interpret
from .base import AttentionInputs, Backend

MAX_HEAD_DIM = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("dit_sparse::block_sparse_attn", mutates_args=())
def _block_sparse_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                          kv_indices: torch.Tensor, kv_block_valid: torch.Tensor | None,
                          out_scale: torch.Tensor | None, out_bias: torch.Tensor | None, block_q: int,
                          block_k: int, scale: float, scale_per_block: bool,
                          bias_per_block: bool, pooled_keys: torch.Tensor | None = None,
                          pooled_values: torch.Tensor | None = None, pooled_log_count: torch.Tensor | None = None,
                          pooled_read: torch.Tensor | None = None,
                          pooled_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.block_sparse_attn import block_sparse_attn_fwd

    return block_sparse_attn_fwd(q, k, v, kv_num_blocks, kv_indices, block_q=block_q, block_k=block_k,
                                 kv_block_valid=kv_block_valid, scale=scale, out_scale=out_scale,
                                 out_bias=out_bias, scale_per_block=scale_per_block,
                                 bias_per_block=bias_per_block, pooled_keys=pooled_keys,
                                 pooled_values=pooled_values, pooled_log_count=pooled_log_count,
                                 pooled_read=pooled_read, pooled_gate=pooled_gate)


@_block_sparse_attn_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, kv_block_valid, out_scale, out_bias, block_q, block_k, scale,
      scale_per_block, bias_per_block, pooled_keys=None, pooled_values=None, pooled_log_count=None,
      pooled_read=None, pooled_gate=None):
    b, s, h, _ = q.shape
    return (q.new_empty(b, s, h, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride (any other strides are fine), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def kernel_input_reasons(inputs: AttentionInputs) -> list[str]:
    """What both Triton kernels (portable and Hopper) refuse: dtype, head dim, block sizes, autograd."""
    q, plan = inputs.query, inputs.plan
    reasons = []
    if q.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use backend='torch'")
    if q.shape[-1] > MAX_HEAD_DIM or inputs.value.shape[-1] != q.shape[-1]:
        reasons.append(f"head_dim {q.shape[-1]} (value {inputs.value.shape[-1]}) is not supported: "
                       f"query and value head_dim must be equal and <= {MAX_HEAD_DIM}")
    if plan.block_q % 16 or plan.block_k % 16:
        reasons.append(f"block sizes must be multiples of 16 for tl.dot, got ({plan.block_q}, {plan.block_k})")
    if q.requires_grad or inputs.key.requires_grad or inputs.value.requires_grad:
        reasons.append("the kernel is forward-only: wrap inference in torch.no_grad()")
    return reasons


class TritonBackend(Backend):
    name = "triton"
    reads_pooled_segment = True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        q = inputs.query
        reasons = []
        if not has_triton():
            reasons.append("triton is not installed: pip install 'dit_sparse[triton]'")
        if q.device.type == "cpu" and not triton_interpret():
            reasons.append("tensors are on CPU and TRITON_INTERPRET is not 1 (Triton kernels need a GPU; "
                           "use backend='torch' on CPU)")
        elif q.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {q.device} is not supported (CUDA, or CPU in the Triton interpreter)")
        return reasons + kernel_input_reasons(inputs)

    def auto_reasons(self, inputs: AttentionInputs) -> list[str]:
        if not inputs.query.is_cuda:
            return ["the Triton interpreter on CPU is for tests (about 1000x slower than backend='torch')"]
        return []

    def forward(self, inputs: AttentionInputs):
        plan = inputs.plan
        q, k, v = unit_stride_qkv(inputs)
        num, idx = plan.expand(q.shape[0], q.shape[2])
        kbv, scale_t, bias_t, seg = kernel_operands(inputs, q.shape[0], q.shape[2])
        out, lse = _block_sparse_attn_op(q, k, v, num, idx, kbv, scale_t,
                                         bias_t, plan.block_q, plan.block_k, float(inputs.scale),
                                         plan.scale_per_block, plan.bias_per_block, *seg)
        return out, (lse if inputs.return_lse else None)


def unit_stride_qkv(inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as both kernels read them: the head dim with unit stride (``x[..., ::2]`` would be read wrong), so
    such inputs are copied."""
    return tuple(_unit_stride(t) for t in (inputs.query, inputs.key, inputs.value))


def kernel_operands(inputs: AttentionInputs, b: int, h: int) -> tuple:
    """The plan's optional operands as both Triton kernels take them, broadcast to batch ``b`` and heads ``h``:
    ``(kv_block_valid, out_scale, out_bias, pooled segment tuple)`` (None / ``()`` where absent)."""
    plan = inputs.plan
    kbv = None if plan.kv_block_valid is None else plan.kv_block_valid.contiguous()  # read with unit stride
    scale_t = None if plan.out_scale is None else plan.out_scale.float().expand(b, h, plan.out_scale.shape[-1])
    bias_t = None if plan.out_bias is None else plan.out_bias.expand(b, plan.out_bias.shape[1], h,
                                                                      plan.out_bias.shape[-1])
    seg = ()
    if inputs.pooled is not None:
        ps = inputs.pooled
        seg = (ps.keys.expand(b, h, -1, -1), ps.values.expand(b, h, -1, -1), ps.log_count,
               ps.read.expand(b, h, -1, -1), None if ps.gate is None else ps.gate.expand(b, h, -1, -1))
    return kbv, scale_t, bias_t, seg
