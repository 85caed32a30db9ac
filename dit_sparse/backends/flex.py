"""The ``flex`` backend: ``torch.nn.attention.flex_attention`` with the plan as a ``BlockMask``.

A peer and a second oracle. The epilogue runs in torch after the call. On CPU flex runs eagerly (slow) and is
only used when named.
"""

from __future__ import annotations

import functools

import torch

from .._env import has_flex_attention
from ..epilogue import apply_epilogue
from .base import AttentionInputs, Backend


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


#: shape signatures one process may compile (a compiled flex call raises dynamo's recompile limit to at least this)
MAX_SIGNATURES = 32


def recompile_limit() -> int:
    """The recompile limit compiled flex calls run under: dynamo's, raised to :data:`MAX_SIGNATURES`."""
    return max(int(torch._dynamo.config.recompile_limit), MAX_SIGNATURES)


def compiled_flex_attention(query, key, value, *, limit: int | None = None, what: str = "this call", **kwargs):
    """``torch.compile(flex_attention)`` (one compiled wrapper per process) under :func:`recompile_limit` (or
    ``limit``). Past the limit dynamo would run flex uncompiled, which reads only ``mask_mod``, not the block tables
    (a wrong answer for a plan whose blocks are not in its mask, and ``S x S`` memory): this raises
    ``NotImplementedError`` naming ``what`` and the fix instead."""
    limit = recompile_limit() if limit is None else limit
    try:
        with torch._dynamo.config.patch(recompile_limit=limit, fail_on_recompile_limit_hit=True):
            return _compiled_flex()(query, key, value, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise NotImplementedError(
            f"torch._dynamo's recompile limit ({limit}) was hit compiling flex_attention for {what} (every compiled "
            "flex_attention call in this process counts); keep the sequence lengths fixed, raise "
            "torch._dynamo.config.recompile_limit, or pass backend='torch'") from e


class FlexBackend(Backend):
    name = "flex"

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        reasons = []
        if not has_flex_attention():
            reasons.append(f"torch {torch.__version__} has no flex_attention (needs torch >= 2.5)")
        d = inputs.query.shape[-1]
        if d < 16 or d & (d - 1):
            reasons.append(f"flex_attention needs a power-of-two head_dim >= 16, got {d}")
        if inputs.query.requires_grad or inputs.key.requires_grad or inputs.value.requires_grad:
            reasons.append("dit_sparse is forward-only: wrap inference in torch.no_grad()")
        return reasons

    def auto_reasons(self, inputs: AttentionInputs) -> list[str]:
        return [] if inputs.query.is_cuda else ["flex_attention on CPU runs uncompiled and slowly"]

    def forward(self, inputs: AttentionInputs):
        from torch.nn.attention.flex_attention import flex_attention

        q, k, v = (t.transpose(1, 2) for t in (inputs.query, inputs.key, inputs.value))
        fn = compiled_flex_attention if q.is_cuda else flex_attention
        try:  # torch >= 2.9 asks for the LSE through AuxRequest; return_lse is deprecated
            from torch.nn.attention.flex_attention import AuxRequest

            out, aux = fn(q, k, v, block_mask=inputs.plan.to_flex(eager_safe=not q.is_cuda), scale=inputs.scale,
                          return_aux=AuxRequest(lse=True))
            lse = aux.lse
        except ImportError:
            out, lse = fn(q, k, v, block_mask=inputs.plan.to_flex(eager_safe=not q.is_cuda), scale=inputs.scale,
                          return_lse=True)
        out = out.transpose(1, 2)
        if inputs.plan.has_epilogue:
            out = apply_epilogue(out.float(), inputs.plan).to(inputs.query.dtype)
        return out, lse.float()
