"""Backend interface: every backend declares what it supports and explains what it does not."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import SparsePlan
from ..segment import PooledSegment

__all__ = ["AttentionInputs", "Backend"]


@dataclass(frozen=True)
class AttentionInputs:
    """One validated call of :func:`dit_sparse.block_sparse_attention` (``[B, S, H, D]`` tensors)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    plan: SparsePlan
    scale: float
    return_lse: bool
    #: extra pooled key segment read in the same softmax (docs/rectification.md#row-combine); only some backends run it
    pooled: PooledSegment | None = None

    def describe(self) -> str:
        q, k = self.query, self.key
        return (f"query={tuple(q.shape)} key={tuple(k.shape)} dtype={q.dtype} device={q.device} "
                f"blocks=({self.plan.block_q}, {self.plan.block_k}) density={self.plan.density:.3f} "
                f"return_lse={self.return_lse} grad={q.requires_grad or k.requires_grad}"
                + ("" if self.pooled is None else f" pooled_keys={self.pooled.num_keys}"))


class Backend:
    """A way to run block-sparse attention.

    Subclasses set ``name`` and implement ``not_supported_reasons`` (empty list = can run) and ``forward``,
    which returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32 or None)``.
    """

    name: str = "base"
    #: picked by automatic dispatch; backends that are only useful when named (e.g. the Triton interpreter
    #: on CPU, which is ~1000x slower than the torch path) still run when asked for explicitly
    auto: bool = True
    #: reads a :class:`~dit_sparse.segment.PooledSegment` (``block_sparse_attention(..., pooled=...)``)
    reads_pooled_segment: bool = False

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        raise NotImplementedError

    def auto_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Extra reasons that keep automatic dispatch away (the backend may still run when named)."""
        return []

    def segment_reasons(self, inputs: AttentionInputs) -> list[str]:
        """Why this backend cannot read the call's pooled key segment (empty when there is none or it can)."""
        if inputs.pooled is not None and not self.reads_pooled_segment:
            return [f"backend {self.name!r} does not read a pooled key segment (pooled=...); the torch, compiled, "
                    "triton and hopper backends do"]
        return []

    def forward(self, inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError
