"""The ``triton`` backend: the block-sparse FlashAttention kernel, registered as a ``torch.library`` custom op.

The custom op (with a fake twin) keeps ``torch.compile`` graphs whole around the kernel. On CPU the kernel runs
in Triton's interpreter when ``TRITON_INTERPRET=1``; automatic dispatch never picks that (it is for tests).
Both Triton kernels' ops (this one and ``hopper``'s) are built by :func:`kernel_op` from one operand list:
:data:`PLAN_OPERANDS` and :data:`POOLED_OPERANDS`, plus each kernel's plan tables and switches.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .._env import has_triton, triton_interpret
from .base import AttentionInputs, Backend

MAX_HEAD_DIM = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: ``(name, type)`` of the operands every Triton kernel op takes after q, k, v and its plan tables, in op order:
#: the key-validity and epilogue tensors (None where the plan has none), then the plan's scalars
PLAN_OPERANDS = (("kv_block_valid", torch.Tensor | None), ("out_scale", torch.Tensor | None),
                 ("out_bias", torch.Tensor | None), ("block_q", int), ("block_k", int), ("scale", float),
                 ("scale_per_block", bool), ("bias_per_block", bool))
#: the pooled key segment, the last operands of every Triton kernel op (default None: no segment)
POOLED_OPERANDS = tuple((name, torch.Tensor | None) for name in ("pooled_keys", "pooled_values", "pooled_log_count",
                                                                 "pooled_read", "pooled_gate"))


def kernel_op(name: str, tables: tuple, launch: Callable, switches: tuple = ()):
    """Register a Triton kernel's launcher as the ``torch.library`` custom op ``dit_sparse::<name>`` and return it.

    The op's operands, each ``(name, type)``, are ``q, k, v`` (``[B, S, H, D]`` tensors), the kernel's plan
    ``tables``, :data:`PLAN_OPERANDS`, the kernel's ``switches`` and :data:`POOLED_OPERANDS` (default None), in
    that order. The op's typed signature (torch infers its schema from it) and its fake (``out [B, Sq, H, Dv]`` in
    q's dtype and float32 ``lse [B, H, Sq]``, what every launcher returns) both come from that one list. The op
    takes its operands positionally or by name (the pooled ones may be left out); ``launch`` is called with every
    operand by name and returns ``(out, lse)``.
    """

    def param(name, annotation, default=inspect.Parameter.empty):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation,
                                 default=default)

    params = [param(n, t) for n, t in (("q", torch.Tensor), ("k", torch.Tensor), ("v", torch.Tensor), *tables,
                                       *PLAN_OPERANDS, *switches)]
    params += [param(n, t, None) for n, t in POOLED_OPERANDS]
    signature = inspect.Signature(params, return_annotation=tuple[torch.Tensor, torch.Tensor])
    names = tuple(signature.parameters)
    defaults = dict.fromkeys(n for n, _ in POOLED_OPERANDS)

    def operands(args, kwargs) -> dict:
        # the dispatcher has checked the call against the schema: name the operands without re-binding them
        # (Signature.bind costs ~13 us a call, on every attention call's host path)
        return {**defaults, **dict(zip(names, args)), **kwargs}

    def impl(*args, **kwargs):
        return launch(**operands(args, kwargs))

    def fake(*args, **kwargs):
        ops = operands(args, kwargs)
        q, v = ops["q"], ops["v"]
        b, s, h, _ = q.shape
        return (q.new_empty(b, s, h, v.shape[-1]), q.new_empty(b, h, s, dtype=torch.float32))

    impl.__signature__ = signature
    op = torch.library.custom_op(f"dit_sparse::{name}", impl, mutates_args=())
    op.register_fake(fake)
    return op


def _launch_portable(**operands):
    from ..kernels.block_sparse_attn import block_sparse_attn_fwd

    return block_sparse_attn_fwd(**operands)


#: the plan as the kernel reads it, its CSR rows
_TABLES = (("kv_num_blocks", torch.Tensor), ("kv_indices", torch.Tensor))
_block_sparse_attn_op = kernel_op("block_sparse_attn", _TABLES, _launch_portable)


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
        out, lse = _block_sparse_attn_op(q, k, v, num, idx, **kernel_operands(inputs, q.shape[0], q.shape[2]))
        return out, (lse if inputs.return_lse else None)


def unit_stride_qkv(inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as both kernels read them: the head dim with unit stride (``x[..., ::2]`` would be read wrong), so
    such inputs are copied."""
    return tuple(_unit_stride(t) for t in (inputs.query, inputs.key, inputs.value))


def kernel_operands(inputs: AttentionInputs, b: int, h: int) -> dict:
    """:data:`PLAN_OPERANDS` by name, as both Triton kernels take them (the plan's optional tensors broadcast to
    batch ``b`` and heads ``h``, None where absent), and :data:`POOLED_OPERANDS` where the call has a segment."""
    plan = inputs.plan
    ops = dict(
        kv_block_valid=None if plan.kv_block_valid is None else plan.kv_block_valid.contiguous(),  # unit stride
        out_scale=None if plan.out_scale is None else plan.out_scale.float().expand(b, h, plan.out_scale.shape[-1]),
        out_bias=None if plan.out_bias is None else plan.out_bias.expand(b, plan.out_bias.shape[1], h,
                                                                         plan.out_bias.shape[-1]),
        block_q=plan.block_q, block_k=plan.block_k, scale=float(inputs.scale), scale_per_block=plan.scale_per_block,
        bias_per_block=plan.bias_per_block)
    ps = inputs.pooled
    if ps is not None:
        ops.update(pooled_keys=ps.keys.expand(b, h, -1, -1), pooled_values=ps.values.expand(b, h, -1, -1),
                   pooled_log_count=ps.log_count, pooled_read=ps.read.expand(b, h, -1, -1),
                   pooled_gate=None if ps.gate is None else ps.gate.expand(b, h, -1, -1))
    return ops
