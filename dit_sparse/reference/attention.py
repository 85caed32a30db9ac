"""Pure-PyTorch block-sparse attention: the test oracle and the CPU fallback (``backend="torch"``).

Exact masked-softmax math, chunked over query blocks so that no ``S x S`` score matrix is ever held for long
sequences. Computes in float32 (float64 for float64 inputs) whatever the input dtype.

Semantics every backend must reproduce (see ``dit_sparse.plan.SparsePlan``)::

    out[b, s, h] = out_scale[b, h, s] * softmax_{keys in plan row}(q . k * scale) @ v  +  out_bias[b, s, h]
    lse[b, h, s] = log sum_{keys in plan row} exp(q . k * scale)          (natural log)

A query row that reads no key returns exactly ``out_bias`` (0 without one) and ``lse = -inf``; never NaN.

With a :class:`~dit_sparse.segment.PooledSegment` ``pooled``, the softmax (and ``lse``) also runs over the pooled keys
each row may read, as extra columns ``q . k̄_j * scale + log_count[j]`` with values ``v̄_j``
(docs/rectification.md#row-combine).
"""

from __future__ import annotations

import math

import torch

from ..epilogue import apply_epilogue
from ..plan import SparsePlan
from ..segment import PooledSegment

__all__ = ["block_sparse_attention_reference", "key_token_mask"]

#: bytes of fp32 scores one chunk may hold; bounds the reference's memory at any sequence length
CHUNK_BYTES = 256 * 2**20


def key_token_mask(plan: SparsePlan) -> torch.Tensor:
    """Bool ``[seq_k]``: which key positions are real tokens (not block padding)."""
    pos = torch.arange(plan.seq_k, device=plan.device)
    if plan.kv_block_valid is None:
        return torch.ones(plan.seq_k, dtype=torch.bool, device=plan.device)
    return (pos % plan.block_k) < plan.kv_block_valid.long()[pos // plan.block_k]


def block_sparse_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     plan: SparsePlan, *, scale: float | None = None,
                                     return_lse: bool = False, pooled: PooledSegment | None = None):
    """Reference block-sparse attention on ``[B, S, H, D]`` tensors. See the module docstring.

    Returns ``out [B, seq_q, H, D]`` in the input dtype, and ``lse [B, H, seq_q]`` (float32; float64 for
    float64 inputs) when ``return_lse``.
    """
    bsz, seq_q, heads, dim = query.shape
    seq_k = key.shape[1]
    cdtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)

    q = query.transpose(1, 2).to(cdtype)  # [B, H, Sq, D]
    k = key.transpose(1, 2).to(cdtype)
    v = value.transpose(1, 2).to(cdtype)
    blocks = plan.to_dense().expand(bsz, heads, plan.num_q_blocks, plan.num_k_blocks)
    kmask = key_token_mask(plan)
    col_block = torch.arange(seq_k, device=query.device) // plan.block_k

    out = torch.empty(bsz, heads, seq_q, v.shape[-1], dtype=cdtype, device=query.device)
    lse = torch.empty(bsz, heads, seq_q, dtype=cdtype, device=query.device)
    if pooled is not None:
        pk = pooled.keys.to(cdtype).expand(bsz, heads, -1, -1)
        pv = pooled.values.to(cdtype).expand(bsz, heads, -1, -1)
        pg = None if pooled.gate is None else pooled.gate.to(cdtype).expand(bsz, heads, -1, -1)
        pread = pooled.read.expand(bsz, heads, -1, -1)
        pbias = pooled.log_count.to(cdtype)
    bytes_per_row = max(bsz * heads * (seq_k + (0 if pooled is None else pooled.num_keys)) * 4 * 3, 1)
    rows = max(plan.block_q, (CHUNK_BYTES // bytes_per_row) // plan.block_q * plan.block_q)
    for start in range(0, seq_q, rows):
        stop = min(start + rows, seq_q)
        s = torch.matmul(q[:, :, start:stop], k.transpose(-1, -2)) * scale  # [B, H, r, Sk]
        row_block = torch.arange(start, stop, device=query.device) // plan.block_q
        allowed = blocks[:, :, row_block][..., col_block] & kmask  # [B, H, r, Sk]
        s = s.masked_fill(~allowed, float("-inf"))
        vv = v
        if pooled is not None:  # the pooled segment: extra columns of the same softmax
            qc = q[:, :, start:stop]
            dots = torch.matmul(qc, pk.transpose(-1, -2))  # [B, H, r, Nk]
            ok = pread[:, :, row_block]
            if pg is not None:
                ok = ok & (dots.abs() > torch.matmul(qc, pg.transpose(-1, -2)).abs())
            s = torch.cat([s, (dots * scale + pbias).masked_fill(~ok, float("-inf"))], dim=-1)
            vv = torch.cat([v, pv], dim=-2)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        o = torch.matmul(p, vv) / torch.where(den > 0, den, torch.ones_like(den))
        out[:, :, start:stop] = o
        lse[:, :, start:stop] = torch.where(den > 0, m + torch.log(den), torch.full_like(den, float("-inf")))[..., 0]

    out = apply_epilogue(out.transpose(1, 2), plan)
    out = out.to(query.dtype)
    if return_lse:
        return out, lse if cdtype == torch.float64 else lse.float()
    return out
