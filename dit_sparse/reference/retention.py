"""Brute-force float64 oracle for Re-ttention's cached terms (arXiv 2505.22918), for tests.

Computes the paper's definitions directly from the full score matrix, with no log-sum-exp shortcut::

    rho[b, h, i] = sum_{j in S_i} exp(s_ij) / sum_{j real} exp(s_ij)        S_i = keys of the block mask row
    R[b, i, h]   = O_full[b, i, h] - rho[b, h, i] * O_sparse[b, i, h]

on permuted tensors of a :class:`~dit_sparse.TokenLayout` (padding key slots never count). Slow (loops over
batch and heads, ``P x P`` scores): use on small inputs only.

Shapes: B batch, P = ``layout.padded_len``, H heads, D head dim, N = ``layout.num_blocks``.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout

__all__ = ["retention_terms_reference"]


def retention_terms_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: torch.Tensor,
                              layout: TokenLayout, *, scale: float | None = None):
    """Exact ``(rho [B, H, P], residual [B, P, H, D], out_full, out_sparse)`` in float64.

    Args:
        query, key, value (`torch.Tensor`): permuted ``[B, P, H, D]``.
        block_mask (`torch.Tensor`): bool ``[B | 1, H | 1, N, N]`` (True = the query block reads the key block).
        layout (`TokenLayout`): the layout the tensors were permuted with.
        scale (`float`, *optional*): softmax scale, ``1 / sqrt(D)`` by default.

    Rows that read no real key (impossible for a dense row of a valid layout) get ``rho = 1`` and zero outputs.
    """
    bsz, p, heads, dim = query.shape
    bs = layout.block_size
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    valid = layout.block_valid(query.device).long()
    pos = torch.arange(p, device=query.device)
    key_real = (pos % bs) < valid[pos // bs]  # [P]
    blocks = block_mask.expand(bsz, heads, *block_mask.shape[-2:])
    rho = torch.ones(bsz, heads, p, dtype=torch.float64)
    out_full = torch.zeros(bsz, p, heads, value.shape[-1], dtype=torch.float64)
    out_sparse = torch.zeros_like(out_full)
    for b in range(bsz):
        for h in range(heads):
            q, k, v = (t[b, :, h].double() for t in (query, key, value))
            s = (q @ k.T) * scale  # [P, P]
            allowed = blocks[b, h][pos // bs][:, pos // bs] & key_real[None, :]
            full = key_real[None, :].expand(p, p)
            m = s.masked_fill(~full, float("-inf")).amax(-1, keepdim=True)
            e = torch.exp(s - m)
            den_full = (e * full).sum(-1)
            den_sparse = (e * allowed).sum(-1)
            ok_full, ok_sparse = den_full > 0, den_sparse > 0
            out_full[b, :, h] = torch.where(ok_full[:, None], ((e * full) @ v) / den_full.clamp_min(1e-300)[:, None],
                                            0.0)
            out_sparse[b, :, h] = torch.where(ok_sparse[:, None],
                                              ((e * allowed) @ v) / den_sparse.clamp_min(1e-300)[:, None], 0.0)
            rho[b, h] = torch.where(ok_full, den_sparse / den_full.clamp_min(1e-300), 1.0)
    residual = out_full - rho.transpose(1, 2).unsqueeze(-1) * out_sparse
    return rho, residual, out_full, out_sparse
