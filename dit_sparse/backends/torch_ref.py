"""The ``torch`` backend: the reference implementation (exact; any device, dtype and block size)."""

from __future__ import annotations

from ..reference.attention import block_sparse_attention_reference
from .base import AttentionInputs, Backend


class TorchBackend(Backend):
    name = "torch"
    reads_pooled_segment = True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        return []

    def forward(self, inputs: AttentionInputs):
        res = block_sparse_attention_reference(inputs.query, inputs.key, inputs.value, inputs.plan,
                                               scale=inputs.scale, return_lse=inputs.return_lse,
                                               pooled=inputs.pooled)
        return res if inputs.return_lse else (res, None)
