"""Shared test helpers: tolerances, relative error, and STRUCTURED attention inputs.

Random q/k give near-uniform attention and prove nothing about sparse-attention quality, so fidelity tests use
``structured_qkv``: tokens of a latent grid whose queries and keys encode (a) spatio-temporal locality through
random Fourier features of the (f, y, x) position, (b) a few semantic clusters shared across the grid (long-range
attention) and (c) attention sinks in latent frame 0. Values are spatially smooth content (low-frequency
features of the position, correlation length ``value_length_scale``) plus a little noise, as image latents are.
``noise`` adds i.i.d. per-token variation to q and k, which makes block means poor estimates of their tokens
(the regime GAPR protects against).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dit_sparse import TokenLayout

#: float tolerances by dtype (atol, rtol) for kernel-vs-reference comparisons
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def structured_qkv(layout: TokenLayout, *, batch: int = 1, heads: int = 2, dim: int = 32,
                   length_scale: float = 0.12, sharpness: float = 6.0, clusters: int = 4,
                   cluster_strength: float = 1.5, sinks: float = 2.0, noise: float = 0.0, seed: int = 0,
                   value_length_scale: float = 0.5, dtype: torch.dtype = torch.float64):
    """Structured ``(q, k, v)`` in model order ``[B, S, H, D]`` for ``layout`` (text tokens included)."""
    g = torch.Generator().manual_seed(seed)
    T, Hg, Wg = layout.grid
    f, y, x = torch.meshgrid(torch.arange(T), torch.arange(Hg), torch.arange(Wg), indexing="ij")
    span = max(T, Hg, Wg)
    pos = torch.stack([f, y, x], -1).reshape(-1, 3).double() / span  # [Nv, 3]
    nv = pos.shape[0]
    half = dim // 2
    out_q, out_k, out_v = [], [], []
    for _ in range(heads):
        omega = torch.randn(3, half, generator=g, dtype=torch.float64) / length_scale
        proj = pos @ omega
        phi = torch.cat([proj.cos(), proj.sin()], -1) / math.sqrt(half)  # phi.phi' ~ exp(-|dp|^2 / 2l^2)
        if phi.shape[-1] < dim:
            phi = torch.cat([phi, torch.zeros(nv, dim - phi.shape[-1], dtype=torch.float64)], -1)
        amp = math.sqrt(sharpness * math.sqrt(dim))
        q = amp * phi
        k = amp * phi
        # semantic clusters: contiguous blobs of the grid share an embedding (long-range attention)
        centers = torch.rand(clusters, 3, generator=g, dtype=torch.float64)
        cid = torch.cdist(pos, centers).argmin(1)
        emb = torch.randn(clusters, dim, generator=g, dtype=torch.float64)
        emb = emb / emb.norm(dim=-1, keepdim=True) * math.sqrt(cluster_strength * math.sqrt(dim))
        q = q + emb[cid]
        k = k + emb[cid]
        # attention sinks: keys of latent frame 0 share a direction every query likes
        sdir = torch.randn(dim, generator=g, dtype=torch.float64)
        sdir = sdir / sdir.norm() * math.sqrt(sinks * math.sqrt(dim))
        is_sink = (f.reshape(-1) == 0) & (torch.rand(nv, generator=g) < 0.05)
        k = k + is_sink[:, None] * sdir
        q = q + 0.5 * sdir
        if noise:
            q = q + noise * torch.randn(nv, dim, generator=g, dtype=torch.float64)
            k = k + noise * torch.randn(nv, dim, generator=g, dtype=torch.float64)
        # values: spatially smooth content (low-frequency features of the position) plus a little noise
        omega_v = torch.randn(3, half, generator=g, dtype=torch.float64) / value_length_scale
        proj_v = pos @ omega_v + 2 * math.pi * torch.rand(half, generator=g, dtype=torch.float64)
        v = torch.cat([proj_v.cos(), proj_v.sin()], -1)
        if v.shape[-1] < dim:
            v = torch.cat([v, torch.zeros(nv, dim - v.shape[-1], dtype=torch.float64)], -1)
        v = v + 0.1 * torch.randn(nv, dim, generator=g, dtype=torch.float64)
        out_q.append(q)
        out_k.append(k)
        out_v.append(v)
    q, k, v = (torch.stack(t, 1) for t in (out_q, out_k, out_v))  # [Nv, H, D]
    if layout.text_tokens:
        nt = layout.text_tokens
        tq, tk, tv = (torch.randn(nt, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
        cat = (lambda vid, txt: torch.cat([txt, vid]) if layout.text_position == "before" else torch.cat([vid, txt]))
        q, k, v = cat(q, tq), cat(k, tk), cat(v, tv)
    q, k, v = (t.unsqueeze(0).expand(batch, -1, -1, -1).contiguous().to(dtype) for t in (q, k, v))
    if batch > 1:  # different samples differ a little
        q = q + 0.05 * torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


#: the three structured input families: broad attention, local attention, and a few isolated
#: bright keys on a flat field (where a skipped block's mean key stands for none of the keys that matter)
FAMILIES = ("diffuse", "local", "sharp_sparse")


def structured_family(layout: TokenLayout, family: str, *, batch: int = 1, heads: int = 2, dim: int = 32,
                      seed: int = 0, dtype: torch.dtype = torch.float64):
    """``(q, k, v)`` in model order of one of :data:`FAMILIES` for ``layout``.

    * ``diffuse``: long correlation length, weak logits, weak clusters: attention spread over most blocks.
    * ``local``: the default :func:`structured_qkv` (locality, clusters, frame-0 sinks).
    * ``sharp_sparse``: small random keys and queries (a flat field of logits near 0) plus a few isolated key
      tokens per head (about 0.6% of the grid) that share one object direction and one object value; every query
      points at the object, so each attention row has a few isolated bright points (logit about 6-10) on a dark
      field. Most bright keys sit in blocks a sparse plan skips, where a block mean hides them.
    """
    if family == "diffuse":
        return structured_qkv(layout, batch=batch, heads=heads, dim=dim, length_scale=0.6, sharpness=1.0,
                              clusters=2, cluster_strength=0.3, sinks=0.3, seed=seed, dtype=dtype)
    if family == "local":
        return structured_qkv(layout, batch=batch, heads=heads, dim=dim, seed=seed, dtype=dtype)
    if family != "sharp_sparse":
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}.")
    g = torch.Generator().manual_seed(10_000 + seed)
    nv, dev = layout.num_video_tokens, 0.3
    q = dev * torch.randn(nv, heads, dim, generator=g, dtype=torch.float64)  # flat field: logits ~ 0
    k = dev * torch.randn(nv, heads, dim, generator=g, dtype=torch.float64)
    _, _, v = structured_qkv(dataclasses.replace(layout, text_tokens=0), heads=heads, dim=dim, seed=seed,
                             dtype=torch.float64)
    v = v[0].clone()  # smooth background content
    peaks = max(2, nv // 48)  # isolated bright keys: ~2% of the tokens, more than a sparse plan keeps blocks
    amp = math.sqrt(10.0 * math.sqrt(dim))  # peak logit ~ 10 * (query weight in [0.6, 1])
    for h in range(heads):
        obj = torch.randn(dim, generator=g, dtype=torch.float64)
        obj = obj / obj.norm()
        where = torch.randperm(nv, generator=g)[:peaks]
        k[where, h] += amp * obj
        v[where, h] = 2.0 + 0.1 * torch.randn(peaks, dim, generator=g, dtype=torch.float64)  # one object's value
        q[:, h] += amp * (0.6 + 0.4 * torch.rand(nv, 1, generator=g, dtype=torch.float64)) * obj
    if layout.text_tokens:
        nt = layout.text_tokens
        tq, tk, tv = (torch.randn(nt, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
        cat = (lambda vid, txt: torch.cat([txt, vid]) if layout.text_position == "before" else torch.cat([vid, txt]))
        q, k, v = cat(q, tq), cat(k, tk), cat(v, tv)
    return tuple(t.unsqueeze(0).expand(batch, -1, -1, -1).contiguous().to(dtype) for t in (q, k, v))


def always_sparse(preset):
    """A preset's config (name or config) with ``min_tokens=0``: sparse even below the CPU's break-even (the
    presets' ``DensePolicy(min_tokens="auto")`` runs the embedded model's 320 tokens dense)."""
    from dit_sparse.integration.pipelines.presets import with_min_tokens

    return with_min_tokens(preset, 0)
