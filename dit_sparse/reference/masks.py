"""Brute-force block-mask builders: slow, loop-based, float64 oracles for the methods' vectorised selections.

Only for tests and debugging. Nothing here imports the method modules, so an oracle never shares a bug with the
code it checks; configs are read by attribute only.

DraftAttention (docs/draft_attention.md): :func:`draft_map_reference`, :func:`draft_mask_reference`.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout
from .layout import block_bbox_reference

__all__ = ["draft_map_reference", "draft_mask_reference"]


def draft_map_reference(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout,
                        scale: float | None = None) -> torch.Tensor:
    """float64 ``[B, H, Nv, Nv]`` draft map: true-count block means of q and k, ``softmax(q̄ k̄ᵀ scale + log n_j)``
    with ``n_j`` the real tokens of key block ``j``.

    Loops over batch, head and block; padding slots are skipped by index (only the first ``block_valid`` slots
    of a block are averaged), not by their zero values.
    """
    bsz, _, heads, dim = q_perm.shape
    nv, bs = layout.num_video_blocks, layout.block_size
    valid = [int(v) for v in layout.block_valid()]
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    out = torch.empty(bsz, heads, nv, nv, dtype=torch.float64)
    q64, k64 = q_perm.detach().cpu().double(), k_perm.detach().cpu().double()
    for b in range(bsz):
        for h in range(heads):
            qbar = torch.stack([q64[b, i * bs: i * bs + valid[i], h].mean(0) for i in range(nv)])  # [Nv, D]
            kbar = torch.stack([k64[b, j * bs: j * bs + valid[j], h].mean(0) for j in range(nv)])
            logits = qbar @ kbar.T * scale + torch.tensor(valid[:nv], dtype=torch.float64).log()  # [Nv, Nv]
            e = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
            out[b, h] = e / e.sum(dim=1, keepdim=True)
    return out


def _frame_ranges(layout: TokenLayout) -> list[tuple[int, int]]:
    """Inclusive latent-frame range of every video block's tokens (its temporal tile's frames, for a tile)."""
    return [(lo[0], hi[0]) for lo, hi in block_bbox_reference(layout)]


def _forced_video(layout: TokenLayout, config, i: int) -> set[int]:
    """Forced video key blocks of video query block ``i`` (see ``forced_draft_mask``): the diagonal; the sink,
    blocks holding frame 0 (when some block holds none); with ``same_frame`` the blocks sharing a frame with ``i``.
    """
    if config.selection == "head_global":
        return set()
    fr = _frame_ranges(layout)
    nv = len(fr)
    forced = {i}
    if config.sink and config.sink_share is None and any(f0 > 0 for f0, _ in fr):
        forced |= {j for j in range(nv) if fr[j][0] == 0}
    if config.same_frame:
        forced |= {j for j in range(nv) if fr[j][0] <= fr[i][1] and fr[i][0] <= fr[j][1]}
    return forced


def _budget(nv: int, sparsity: float, k_min: int) -> int:
    return min(nv, max(k_min, math.ceil(round((1.0 - sparsity) * nv, 9))))


def _sink_quota(layout: TokenLayout, config, budget: int) -> tuple[int, set[int]]:
    """``(floor(sink_share * budget) capped at the frame-0 block count, the frame-0 blocks)`` of a
    ``sink_share`` sink, or ``(0, ...)`` without one."""
    fr = _frame_ranges(layout)
    frame0 = {j for j, (f0, _) in enumerate(fr) if f0 == 0}
    if not config.sink or config.sink_share is None or not any(f0 > 0 for f0, _ in fr):
        return 0, frame0
    return min(int(math.floor(round(config.sink_share * budget, 9))), len(frame0)), frame0


def draft_mask_reference(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout, config,
                         scale: float | None = None, draft: torch.Tensor | None = None) -> torch.Tensor:
    """Brute-force DraftAttention block mask, bool ``[B, H, N, N]`` (CPU).

    Args:
        q_perm, k_perm (`torch.Tensor`): permuted ``[B, P, H, D]`` (unused, may be None, when ``draft`` is given).
        layout (`TokenLayout`): their layout.
        config: a ``DraftAttentionConfig`` (read by attribute).
        scale (`float`, *optional*): draft scale, defaults to ``1 / sqrt(D)``.
        draft (`torch.Tensor`, *optional*): ``[B, H, Nv, Nv]`` draft map to select from. Defaults to
            :func:`draft_map_reference`. Pass the implementation's float32 map to compare selections exactly
            (a float64 map can order near-ties differently).

    Rules (written as plainly as possible; ties: lower key block index first):

    * text rows dense, text columns on;
    * ``row_topk``: forced ∪ the first ``budget - |forced|`` non-forced blocks sorted by (-A, index); a
      ``sink_share`` sink of ``s`` blocks takes the first ``s - |forced ∩ frame 0|`` of them from the frame-0
      blocks in that order (never more than the count);
    * ``row_topp``: forced mass counted first (index order), then non-forced blocks in that order while the
      mass kept so far is ``< top_p``; count ``|forced| + taken`` clamped to ``[k_min, budget]`` (``budget``
      when ``top_p >= 1``); then as ``row_topk`` with that count;
    * ``head_global``: τ = the ``int((1 - (1 - s)) * Nv²)``-th smallest value of the head's map; keep ``A >= τ``.
    """
    if draft is None:
        draft = draft_map_reference(q_perm, k_perm, layout, scale)
    a = draft.detach().cpu().double().tolist()  # nested lists [B][H][Nv][Nv] of Python floats
    bsz, heads, nv, n = len(a), len(a[0]), layout.num_video_blocks, layout.num_blocks
    budget = _budget(nv, config.sparsity, config.k_min)
    quota, frame0 = _sink_quota(layout, config, budget) if config.selection != "head_global" else (0, set())
    forced_max = max((len(_forced_video(layout, config, i)) for i in range(nv)), default=0)
    if config.selection != "head_global" and forced_max > budget:
        raise ValueError(f"forced video blocks per row ({forced_max}) exceed the row budget ({budget})")
    # text rows dense, text columns on; video x video filled below
    mask = [[[[i >= nv or j >= nv for j in range(n)] for i in range(n)] for _ in range(heads)] for _ in range(bsz)]
    for b in range(bsz):
        for h in range(heads):
            if config.selection == "head_global":
                flat = sorted(x for row in a[b][h] for x in row)
                k_drop = int((1.0 - (1.0 - config.sparsity)) * len(flat))
                for i in range(nv):
                    for j in range(nv):
                        if k_drop == 0:
                            mask[b][h][i][j] = True
                        elif k_drop < len(flat):
                            mask[b][h][i][j] = a[b][h][i][j] >= flat[k_drop - 1]
                continue
            for i in range(nv):
                row = a[b][h][i]
                forced = _forced_video(layout, config, i)
                rest = sorted((j for j in range(nv) if j not in forced), key=lambda j: (-row[j], j))
                if config.selection == "row_topk":
                    count = budget
                elif config.top_p >= 1.0:
                    count = budget
                else:
                    mass = 0.0
                    for j in range(nv):
                        if j in forced:
                            mass += row[j]
                    taken = 0
                    for j in rest:
                        if mass >= config.top_p:
                            break
                        mass += row[j]
                        taken += 1
                    count = min(max(len(forced) + taken, config.k_min), budget)
                take = max(count - len(forced), 0)
                if quota:
                    sink = [j for j in rest if j in frame0][: min(max(quota - len(forced & frame0), 0), take)]
                    rest = sink + [j for j in rest if j not in sink]
                for j in set(forced) | set(rest[:take]):
                    mask[b][h][i][j] = True
    return torch.tensor(mask, dtype=torch.bool).reshape(bsz, heads, n, n)
