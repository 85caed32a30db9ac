"""``PooledSegment``: an extra key segment of pooled keys that the sparse op reads in the same softmax.

The row combine of pooled rectification (docs/rectification.md#row-combine: exact plus pooled, per row, in one
pass). Each pooled key ``j`` stands for ``n_j`` real keys with mean key ``keys[j]`` and mean value ``values[j]``; it
enters the online softmax of every query row ``u`` of query block ``i`` with the logit::

    ℓ_uj = q_u · keys[j] * scale + log_count[j]             where read[i, j] (and the row gate, if any, passes)

and the value ``values[j]``. So the op computes, for each row, ONE softmax over the plan's exact keys and the
pooled keys this row may read; ``lse`` covers both. The row gate (GAPR per row) is
``|q_u · keys[j]| > |q_u · gate[j]|`` (``gate`` = the block's mean absolute key deviation).

The plan's epilogue (``out_scale``, ``out_bias``) applies after this softmax, as without the segment.

The pooled logits are computed at the exact logits' precision on every backend (see :class:`PooledSegment`):
the means are fp32 (built from 16-bit tokens with fp32 accumulation), and no backend rounds them to the input
dtype before the dot products.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PooledSegment"]


@dataclass(frozen=True, eq=False)
class PooledSegment:
    """Pooled keys read in the same softmax as the plan's exact keys (see the module docstring).

    Args:
        keys (`torch.Tensor`, float32 ``[B|1, H|1, Nk, D]``): pooled (mean) keys.
        values (`torch.Tensor`, float32 ``[B|1, H|1, Nk, Dv]``): pooled (mean) values.
        log_count (`torch.Tensor`, float32 ``[Nk]``): additive natural-log logit bias, ``log n_j`` (finite).
        read (`torch.Tensor`, bool ``[B|1, H|1, Mq, Nk]``): per query block of the plan, which pooled keys its
            rows may read (for row rectification: the video blocks the row's plan skips, and that are reliable).
        gate (`torch.Tensor`, float32 ``[B|1, H|1, Nk, D]``, *optional*): per-row reliability: row ``u`` reads key
            ``j`` only where also ``|q_u · keys[j]| > |q_u · gate[j]|``.

    Precision: the pooled logits (and the gate's dots) are as precise as the exact ones, whatever the input dtype:
    products of the query as the op sees it (in its dtype) with the fp32 keys as they are, accumulated in fp32
    (fp32 inputs: IEEE, no TF32). The keys are never rounded to a 16-bit input dtype: a logit of 30 would move by
    up to 0.12 in bf16 (30 * 2^-8). The pooled values enter at fp32 accuracy too; the probabilities round as the
    exact part's do.
    """

    keys: torch.Tensor
    values: torch.Tensor
    log_count: torch.Tensor
    read: torch.Tensor
    gate: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k, v, c, r, g = self.keys, self.values, self.log_count, self.read, self.gate
        for name, t in (("keys", k), ("values", v), ("log_count", c), ("read", r)):
            if not torch.is_tensor(t):
                raise ValueError(f"PooledSegment.{name} must be a tensor, got {type(t).__name__}.")
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"PooledSegment.keys [B|1, H|1, Nk, D] and values [B|1, H|1, Nk, Dv] must share "
                             f"[B, H, Nk], got {tuple(k.shape)} and {tuple(v.shape)}.")
        nk = k.shape[2]
        if c.shape != (nk,):
            raise ValueError(f"PooledSegment.log_count must be [Nk={nk}], got {tuple(c.shape)}.")
        if r.dtype != torch.bool or r.dim() != 4 or r.shape[-1] != nk:
            raise ValueError(f"PooledSegment.read must be bool [B|1, H|1, Mq, Nk={nk}], got {r.dtype} "
                             f"{tuple(r.shape)}.")
        if g is not None and (not torch.is_tensor(g) or g.shape != k.shape):
            got = tuple(g.shape) if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f"PooledSegment.gate must have the shape of keys {tuple(k.shape)}, got {got}.")
        for name, t in (("keys", k), ("values", v), ("log_count", c), ("gate", g)):
            if t is not None and t.dtype != torch.float32:
                raise ValueError(f"PooledSegment.{name} must be float32, got {t.dtype}; use .float().")
        devs = {t.device for t in (k, v, c, r, g) if t is not None}
        if len(devs) > 1:
            raise ValueError(f"PooledSegment tensors must share one device, got {sorted(map(str, devs))}.")

    @property
    def num_keys(self) -> int:
        return self.keys.shape[2]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def check_against(self, batch: int, heads: int, dim: int, value_dim: int, num_q_blocks: int,
                      device: torch.device) -> None:
        """Raise ``ValueError`` unless this segment serves a call of ``batch`` x ``heads`` with these dims."""
        k, v, r = self.keys, self.values, self.read
        for name, t in (("keys", k), ("values", v), ("read", r)) + ((("gate", self.gate),) if self.gate is not None
                                                                     else ()):
            if t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads):
                raise ValueError(f"PooledSegment.{name} has shape {tuple(t.shape)}, which does not broadcast to "
                                 f"batch={batch}, heads={heads}.")
        if k.shape[-1] != dim or v.shape[-1] != value_dim:
            raise ValueError(f"PooledSegment keys/values have head dims {k.shape[-1]}/{v.shape[-1]}, the call has "
                             f"{dim}/{value_dim}.")
        if r.shape[2] != num_q_blocks:
            raise ValueError(f"PooledSegment.read has {r.shape[2]} query blocks, the plan has {num_q_blocks}.")
        if self.device != device:
            raise ValueError(f"PooledSegment is on {self.device}, the call on {device}; move it with .to().")
