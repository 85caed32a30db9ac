"""Brute-force float64 oracle of pooled rectification (Rectified SpaAttn, docs/rectification.md). Tests only: loops.

Works on **model-order** tensors ``[B, S, H, D]`` and recovers every block's tokens from the grid coordinates
itself (:func:`dit_sparse.reference.layout.block_members_reference`, loops), so it does not share the
permutation, pooling or masking code of :mod:`dit_sparse.methods.pooled_rectification`. Neighbours and the first
frame follow the blocks' token bounding boxes (tiles: tile coordinates).

Semantics (per batch b, head h, video query block i; ``n_j`` real tokens of block j)::

    q̄_i, k̄_j, v̄_j = true-count means;  σ_ij = q̄_i · k̄_j
    w_ij = n_j exp(σ_ij scale) (video),  w_iτ = exp(q̄_i · k_τ scale) (text tokens)
    P̃_ij = w_ij / Σ w ;  P̃_i,txt = Σ_τ w_iτ / Σ w
    selection: sort (P̃ desc, column asc); n_need = #{cumsum <= p} + 1 leading entries; keep the first
               max(#video among them, top_k) video blocks of the order, + neighbours, + first frame,
               + text columns, + dense text rows
    G_ij = |σ_ij|,  E_ij = |a_i · k̄_j| + |q̄_i · b_j|,  Z_ij = G_ij > E_ij
    U_i = C_i ∪ {text} ∪ {j : Z_ij = 0};  R_i = Σ_{U_i} P̃_ij;  c_i = Σ_{j ∉ U_i} P̃_ij v̄_j
    O_u = R_i · softmax(q_u · k scale over the keys of C_i) v + c_i
"""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import torch

from .layout import block_bbox_reference, block_members_reference

__all__ = ["block_members", "rectification_reference", "select_reference", "rectified_attention_reference",
           "row_rectified_attention_reference", "top_k_reference", "select_sorted_reference"]


def block_members(layout) -> list[list[int]]:
    """Model-order token indices of every block: video blocks, then text chunks (:mod:`.layout`'s loop oracle)."""
    return block_members_reference(layout)


def _neighbours(box_i, box_j, tile) -> bool:
    """On every axis the gap between the two boxes is less than one tile side (tiles: coordinates differ <= 1)."""
    (lo_i, hi_i), (lo_j, hi_j) = box_i, box_j
    return all(max(lo_j[a] - hi_i[a], lo_i[a] - hi_j[a]) - 1 < tile[a] for a in range(3))


def _nearest_neighbours(boxes, tile, i: int, count: int) -> set[int]:
    """The ``count`` nearest neighbours of block ``i`` (itself first; then box-centre distance in tiles: the
    largest axis, the sum over axes, the time axis, the index), written as a plain sort."""
    def centre(box, a):
        return (box[0][a] + box[1][a]) / 2 / tile[a]

    def key(j):
        d = [abs(centre(boxes[i], a) - centre(boxes[j], a)) for a in range(3)]
        return (j != i, max(d), sum(d), d[0], j)

    cands = [j for j in range(len(boxes)) if _neighbours(boxes[i], boxes[j], tile)]
    return set(sorted(cands, key=key)[:count])


def top_k_reference(sparsity: float, num_video_blocks: int) -> int:
    """``ceil((1 - sparsity) * Nv)`` (the one budget rule of every method; the paper's code floors) in exact
    decimal arithmetic on the literal value of ``sparsity``."""
    exact = (1 - Decimal(repr(float(sparsity)))) * num_video_blocks
    return min(int(exact.to_integral_value(rounding="ROUND_CEILING")), num_video_blocks)


def select_reference(p_tilde: torch.Tensor, layout, config) -> torch.Tensor:
    """Critical-block selection by full Python sort, from a given ``P̃ [B, H, Nv, Nv + 1]`` -> bool [B, H, N, N]."""
    nv, n = layout.num_video_blocks, layout.num_blocks
    B, H = p_tilde.shape[:2]
    top_k = top_k_reference(config.sparsity, nv)
    boxes = block_bbox_reference(layout)
    pt = p_tilde.detach().to(torch.float64).cpu().tolist()
    mask = np.zeros((B, H, n, n), dtype=bool)
    for b in range(B):
        for h in range(H):
            for i in range(nv):
                row = pt[b][h][i]
                order = sorted(range(nv + 1), key=lambda j: (-row[j], j))
                total, n_need = 0.0, 1
                for j in order:
                    total += row[j]
                    if total <= config.top_p:
                        n_need += 1
                video_order = [j for j in order if j < nv]
                n_video = max(sum(1 for j in order[:n_need] if j < nv), top_k)
                for j in video_order[:n_video]:
                    mask[b, h, i, j] = True
                share = getattr(config, "neighbour_share", None)
                near = None if share is None else _nearest_neighbours(
                    boxes, layout.tile, i, int(math.floor(round(share * top_k, 9))))
                for j in range(nv):
                    if config.neighbours and _neighbours(boxes[i], boxes[j], layout.tile) and (
                            near is None or j in near):
                        mask[b, h, i, j] = True
                    if (config.first_frame_dense and layout.frames > 1 and boxes[i][0][0] == 0
                            and boxes[j][0][0] == 0):
                        mask[b, h, i, j] = True
                for j in range(nv, n):
                    mask[b, h, i, j] = True
            for i in range(nv, n):
                mask[b, h, i, :] = True
    return torch.from_numpy(mask)


def select_sorted_reference(p_tilde: torch.Tensor, nv: int, top_k: int, top_p: float) -> torch.Tensor:
    """The video x video part of :func:`select_reference` (no neighbours, first frame or text), vectorized by a
    full-row sort in torch: bool ``[B, H, Nv, Nv]``. Fast enough for large grids (tests at sizes the loop oracle
    cannot reach, and the "before" of ``benchmarks/plan_overhead.py --selection``): every row is sorted whole
    (P̃ descending, column ascending), ``n_need = #{cumsum <= top_p} + 1`` (float64), and the first
    ``max(#video among the n_need leading entries, top_k)`` video entries are kept."""
    ncol = nv + 1
    p = p_tilde.to(torch.float32)
    bits = p.clamp_min(0.0).contiguous().view(torch.int32).to(torch.int64)
    keys = (bits << 32) | ((ncol - 1) - torch.arange(ncol, dtype=torch.int64, device=p.device))
    idx = keys.sort(dim=-1, descending=True).indices
    cum = p.gather(-1, idx).to(torch.float64).cumsum(-1)
    n_need = (cum <= top_p).sum(-1, keepdim=True) + 1
    is_video = idx < nv
    rank = torch.arange(ncol, device=p.device)
    live = is_video & ((rank < n_need) | (is_video.cumsum(-1) <= top_k))
    picked = torch.zeros(*p.shape[:-1], ncol + 1, dtype=torch.bool, device=p.device)
    picked.scatter_(-1, torch.where(live, idx, torch.full_like(idx, ncol)), True)
    return picked[..., :nv]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy()


def rectification_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout, config, *,
                            scale: float | None = None, mask: torch.Tensor | None = None,
                            p_tilde_for_selection: torch.Tensor | None = None,
                            reliable: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Everything pooled rectification computes, in float64 with loops, on model-order ``[B, S, H, D]`` inputs.

    ``mask`` (bool ``[B|1, H|1, N, N]``) replaces the selection; otherwise the selection runs on
    ``p_tilde_for_selection`` when given (to compare selection sets exactly on the implementation's fp32 ``P̃``),
    else on the oracle's own ``P̃``. ``reliable`` overrides ``Z``. Returns a dict of float64 / bool tensors:
    ``p_tilde``, ``gain``, ``err``, ``reliable``, ``mask``, ``R`` ``[B, H, N]``, ``c`` ``[B, H, N, D]`` and
    ``q_mean``, ``k_mean``, ``v_mean``, ``q_dev``, ``k_dev`` ``[B, H, Nv, D]``.
    """
    q, k, v = (_np(t) for t in (query, key, value))
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    members = block_members(layout)
    nv, n = layout.num_video_blocks, layout.num_blocks
    text_idx = [t for blk in members[nv:] for t in blk]

    qm, km, vm, qd, kd = (np.zeros((B, H, nv, D)) for _ in range(5))
    for b in range(B):
        for h in range(H):
            for j in range(nv):
                idx = members[j]
                qm[b, h, j] = q[b, idx, h].mean(0)
                km[b, h, j] = k[b, idx, h].mean(0)
                vm[b, h, j] = v[b, idx, h].mean(0)
                qd[b, h, j] = np.abs(q[b, idx, h] - qm[b, h, j]).mean(0)
                kd[b, h, j] = np.abs(k[b, idx, h] - km[b, h, j]).mean(0)

    p_tilde = np.zeros((B, H, nv, nv + 1))
    gain = np.zeros((B, H, nv, nv))
    err = np.zeros((B, H, nv, nv))
    for b in range(B):
        for h in range(H):
            for i in range(nv):
                logits = [float(qm[b, h, i] @ km[b, h, j]) * scale for j in range(nv)]
                logits += [float(qm[b, h, i] @ k[b, t, h]) * scale for t in text_idx]
                top = max(logits)
                w = [len(members[j]) * math.exp(logits[j] - top) for j in range(nv)]
                wt = sum(math.exp(s - top) for s in logits[nv:])
                total = sum(w) + wt
                for j in range(nv):
                    p_tilde[b, h, i, j] = w[j] / total
                    gain[b, h, i, j] = abs(float(qm[b, h, i] @ km[b, h, j]))
                    err[b, h, i, j] = abs(float(qd[b, h, i] @ km[b, h, j])) + abs(float(qm[b, h, i] @ kd[b, h, j]))
                p_tilde[b, h, i, nv] = wt / total
    if reliable is None:
        z = gain > err
    else:
        z = np.broadcast_to(reliable.detach().cpu().numpy().astype(bool), (B, H, nv, nv))
    use_z = config.gapr or reliable is not None

    if mask is None:
        sel_p = torch.from_numpy(p_tilde) if p_tilde_for_selection is None else p_tilde_for_selection
        mask = select_reference(sel_p, layout, config)
    mask_np = np.broadcast_to(mask.detach().cpu().numpy().astype(bool), (B, H, n, n))

    R = np.ones((B, H, n))
    c = np.zeros((B, H, n, D))
    for b in range(B):
        for h in range(H):
            for i in range(nv):
                r_sum = p_tilde[b, h, i, nv]  # the text column is always critical
                for j in range(nv):
                    if mask_np[b, h, i, j] or (use_z and not z[b, h, i, j]):
                        r_sum += p_tilde[b, h, i, j]
                    else:
                        c[b, h, i] += p_tilde[b, h, i, j] * vm[b, h, j]
                R[b, h, i] = r_sum
    out = {"p_tilde": p_tilde, "gain": gain, "err": err, "R": R, "c": c, "q_mean": qm, "k_mean": km,
           "v_mean": vm, "q_dev": qd, "k_dev": kd}
    out = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in out.items()}
    out["reliable"] = torch.from_numpy(np.array(z, dtype=bool))
    out["mask"] = torch.from_numpy(np.array(mask_np, dtype=bool))
    return out


def rectified_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout,
                                  mask: torch.Tensor, R: torch.Tensor | None = None, c: torch.Tensor | None = None,
                                  *, scale: float | None = None) -> torch.Tensor:
    """``O_u = R_i · SparseAttn_u(C_i) + c_i`` on model-order ``[B, S, H, D]``, float64, loops over rows' blocks.

    ``mask`` bool ``[B|1, H|1, N, N]``; ``R [B, H, N]`` and ``c [B, H, N, D]`` default to 1 and 0.
    """
    q, k, v = (_np(t) for t in (query, key, value))
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    members = block_members(layout)
    n = len(members)
    mask_np = np.broadcast_to(mask.detach().cpu().numpy().astype(bool), (B, H, n, n))
    R_np = np.ones((B, H, n)) if R is None else _np(R)
    c_np = np.zeros((B, H, n, D)) if c is None else _np(c)
    out = np.zeros((B, S, H, D))
    for b in range(B):
        for h in range(H):
            for i in range(n):
                rows = members[i]
                cols = [t for j in range(n) if mask_np[b, h, i, j] for t in members[j]]
                if not cols:
                    continue
                s = q[b, rows, h] @ k[b, cols, h].T * scale
                p = np.exp(s - s.max(-1, keepdims=True))
                o = (p / p.sum(-1, keepdims=True)) @ v[b, cols, h]
                out[b, rows, h] = R_np[b, h, i] * o + c_np[b, h, i]
    return torch.from_numpy(out)


def row_rectified_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout,
                                      mask: torch.Tensor, *, scale: float | None = None,
                                      gapr: bool = True, row_keys: str = "outlier",
                                      row_outliers: int = 2) -> torch.Tensor:
    """``combine="row"`` rectification on model-order ``[B, S, H, D]``, float64, one softmax per query row.

    ``gapr``, ``row_keys`` and ``row_outliers`` mean, and default to, what the fields of
    :class:`~dit_sparse.methods.pooled_rectification.PooledRectificationConfig` do.

    Video query row ``u`` of block ``i`` attends, in a single softmax, to the exact keys of every block ``mask``
    reads in row ``i`` and to each video block ``j`` it skips. ``row_keys="mean"``: the skipped block enters as one
    pooled key ``k̄_j`` of weight ``n_j`` and value ``v̄_j`` — when ``gapr``, only if ``|q_u · k̄_j| > |q_u · b_j|``
    (``b_j`` = mean absolute key deviation). Text query rows attend to their read blocks only. Rows with no key at
    all are 0. No LSE merge is used, so this checks the implementation's merge independently.

    ``row_keys="outlier"``: a skipped block ``j`` instead enters as its ``row_outliers`` most deviating keys
    exactly (the real tokens ``t`` with the largest ``||k_t - k̄_j||``, lowest index first on ties; their own values)
    plus one pooled key for the other ``n_j - row_outliers`` tokens (their mean key and value, weight
    ``n_j - row_outliers``; none when ``n_j <= row_outliers``, then every token of the block is exact); no GAPR gate.
    """
    q, k, v = (_np(t) for t in (query, key, value))
    B, S, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    members = block_members(layout)
    n, nv = len(members), layout.num_video_blocks
    mask_np = np.broadcast_to(mask.detach().cpu().numpy().astype(bool), (B, H, n, n))
    out = np.zeros((B, S, H, D))
    for b in range(B):
        for h in range(H):
            km = [k[b, members[j], h].mean(0) for j in range(nv)]
            vm = [v[b, members[j], h].mean(0) for j in range(nv)]
            kd = [np.abs(k[b, members[j], h] - km[j]).mean(0) for j in range(nv)]
            for i in range(n):
                cols = [t for j in range(n) if mask_np[b, h, i, j] for t in members[j]]
                for u in members[i]:
                    logits = [float(q[b, u, h] @ k[b, t, h]) * scale for t in cols]
                    values = [v[b, t, h] for t in cols]
                    if i < nv:
                        for j in range(nv):
                            if mask_np[b, h, i, j]:
                                continue
                            if row_keys == "outlier":
                                blk = members[j]
                                dev = [float(np.linalg.norm(k[b, t, h] - km[j])) for t in blk]
                                order = sorted(range(len(blk)), key=lambda x: (-dev[x], x))
                                exact = [blk[x] for x in order[:row_outliers]]
                                for o in exact:
                                    logits.append(float(q[b, u, h] @ k[b, o, h]) * scale)
                                    values.append(v[b, o, h])
                                rest = [t for t in blk if t not in exact]
                                if rest:
                                    k_r, v_r = k[b, rest, h].mean(0), v[b, rest, h].mean(0)
                                    logits.append(float(q[b, u, h] @ k_r) * scale + math.log(len(rest)))
                                    values.append(v_r)
                                continue
                            dot = float(q[b, u, h] @ km[j])
                            if gapr and not abs(dot) > abs(float(q[b, u, h] @ kd[j])):
                                continue
                            logits.append(dot * scale + math.log(len(members[j])))
                            values.append(vm[j])
                    if not logits:
                        continue
                    w = np.exp(np.array(logits) - max(logits))
                    out[b, u, h] = (w / w.sum()) @ np.stack(values)
    return torch.from_numpy(out)
