"""Dense backends for all-on plans (dense warm-up steps, dense layers): SDPA and xformers.

They return no log-sum-exp, so a call that asks for one goes to a block-sparse backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._env import has_xformers
from ..epilogue import apply_epilogue
from .base import AttentionInputs, Backend


def _dense_reasons(inputs: AttentionInputs) -> list[str]:
    """Why a dense kernel cannot run this call. Reads no tensor values for sparse plans (no device sync): only a
    plan flagged ``known_dense`` (``SparsePlan.dense``) qualifies, and only then is ``kv_block_valid`` read."""
    reasons = []
    if inputs.return_lse:
        reasons.append("return_lse=True: dense kernels here do not return the log-sum-exp")
    if not inputs.plan.known_dense:
        reasons.append("plan is not flagged all-dense (SparsePlan.dense sets known_dense=True)")
    elif not reasons and not inputs.plan.keys_all_valid:  # reads kv_block_valid: only when all else fits
        reasons.append("plan masks padding slots inside key blocks (kv_block_valid)")
    return reasons


def _finish(out: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    if inputs.plan.has_epilogue:
        out = apply_epilogue(out.float(), inputs.plan).to(inputs.query.dtype)
    return out


class SDPABackend(Backend):
    """``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash / efficient / math, torch picks)."""

    name = "sdpa"

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        return _dense_reasons(inputs)

    def forward(self, inputs: AttentionInputs):
        q, k, v = (t.transpose(1, 2) for t in (inputs.query, inputs.key, inputs.value))
        out = F.scaled_dot_product_attention(q, k, v, scale=inputs.scale).transpose(1, 2)
        return _finish(out, inputs), None


class XFormersBackend(Backend):
    """xformers ``memory_efficient_attention`` (the ``xformers`` extra; CUDA only)."""

    name = "xformers"
    auto = False

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = _dense_reasons(inputs)
        if not has_xformers():
            reasons.append("xformers is not installed: pip install 'dit_sparse[xformers]'")
        if not inputs.query.is_cuda:
            reasons.append(f"xformers has no kernels for device {inputs.query.device} (CUDA only)")
        if inputs.query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"xformers does not take dtype {inputs.query.dtype}")
        return reasons

    def forward(self, inputs: AttentionInputs):
        import xformers.ops as xops

        out = xops.memory_efficient_attention(inputs.query, inputs.key, inputs.value, scale=inputs.scale)
        return _finish(out, inputs), None
