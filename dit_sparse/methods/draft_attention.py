"""DraftAttention: block selection guided by a low-resolution "draft" attention map.

Paper: *DraftAttention: Fast Video Diffusion via Low-Resolution Attention Guidance* (arXiv 2505.14708), code
``shawnricecake/draft-attention``. Spec: docs/draft_attention.md.

Every tile of the :class:`~dit_sparse.TokenLayout` (one kernel block) is pooled into one draft query and one
draft key (true-count means of the post-RoPE, post-QK-norm q and k). The draft map
``A = softmax_j(q̄_i · k̄_j · scale)`` over the ``Nv`` video blocks (text excluded), in float32, estimates which
(query block, key block) pairs matter; :func:`draft_select` turns it into a bool block mask; text rows and text
columns are always on.

Selections (``DraftAttentionConfig.selection``):

* ``"row_topk"`` (default, ours, docs/draft_attention.md#selection): every video query row keeps ``budget`` video
  blocks, with the forced ones (diagonal, sink, same-frame) counted inside the budget and the rest taken from the top
  of the draft row;
* ``"row_topp"`` (ours): like ``row_topk`` but the count per row is the smallest one whose draft mass reaches
  ``top_p``, clamped to ``[k_min, budget]``;
* ``"head_global"`` (the reference code): one threshold per head over the whole ``Nv x Nv`` probability map.
  Rows may keep no video block at all; it exists for comparisons.

Shapes: B batch, P = ``layout.padded_len`` permuted slots, H heads, D head dim, N = ``layout.num_blocks`` blocks
(video ``Nv`` first, then text).

Example::

    layout = TokenLayout(frames=21, height=30, width=52)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))           # [B, P, H, D]
    plan = draft_plan(qp, kp, layout, DraftAttentionConfig(sparsity=0.75))
    out = layout.unpermute(block_sparse_attention(qp, kp, vp, plan))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._cache import tensor_cache
from ..layout import TokenLayout
from ..plan import SparsePlan
from .base import (
    check_permuted,
    check_share,
    forced_mask,
    frame0_blocks,
    frame_overlap_mask,
    has_temporal_sink,
    keep_blocks,
    plan_from_mask,
    pool_blocks,
    share_blocks,
)

__all__ = [
    "DRAFT_POOLINGS",
    "DraftAttentionConfig",
    "draft_map",
    "draft_mask",
    "draft_plan",
    "draft_select",
    "forced_draft_mask",
    "register_draft_pooling",
    "row_budget",
    "sink_blocks",
]

SELECTIONS = ("row_topk", "row_topp", "head_global")

#: A draft pooling maps permuted ``(q [B, P, H, D], k [B, P, H, D], layout, scale)`` to float32 block logits
#: ``[B, H, Nv, Nv]`` (video blocks only). The draft map is their row softmax.
DraftPooling = Callable[[torch.Tensor, torch.Tensor, TokenLayout, float], torch.Tensor]


def _mean_pool_logits(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout, scale: float) -> torch.Tensor:
    """Paper pooling: true-count block means of q and k, then ``q̄ · k̄ * scale`` (float32)."""
    nv = layout.num_video_blocks
    qb = pool_blocks(q, layout)[:, :, :nv]  # [B, H, Nv, D] float32
    kb = pool_blocks(k, layout)[:, :, :nv]
    return torch.matmul(qb, kb.transpose(-1, -2)) * scale


#: Registry of draft poolings by name (``DraftAttentionConfig.pooling``). Only ``"mean"`` (the paper's average
#: pooling, better than max pooling per its Fig. 6) ships; a log-sum-exp over sub-block pairs (see
#: docs/draft_attention.md#pooling, sglang PR #34148) would register here.
DRAFT_POOLINGS: dict[str, DraftPooling] = {"mean": _mean_pool_logits}


def register_draft_pooling(name: str, fn: DraftPooling) -> None:
    """Register a draft pooling under ``name`` (see :data:`DraftPooling` for the signature)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_draft_pooling: name must be a non-empty str, got {name!r}.")
    if not callable(fn):
        raise ValueError(f"register_draft_pooling: fn must be callable, got {type(fn).__name__}.")
    DRAFT_POOLINGS[name] = fn


@dataclass(frozen=True, kw_only=True)
class DraftAttentionConfig:
    """Semantic knobs of DraftAttention (docs/draft_attention.md). Derive variants with ``dataclasses.replace``.

    Args:
        sparsity (`float`, defaults to 0.75): fraction of video x video block pairs to skip, in ``[0, 1]``. The
            reference Wan code hard-codes 0.75, its HunyuanVideo code 0.9; the paper reports 0.55-0.9. The
            *achieved* density (``SparsePlan.density``) is higher: forced blocks, ``k_min`` and text are extra.
        selection (`str`, defaults to ``"row_topk"``): ``"row_topk"``, ``"row_topp"`` or ``"head_global"``
            (see :func:`draft_select`). ``row_topk`` is ours (docs/draft_attention.md#selection); ``head_global``
            reproduces the reference code's per-head threshold on softmax probabilities (ties kept) and may starve
            rows.
        top_p (`float`, defaults to 0.9): draft mass to reach per row for ``"row_topp"``, in ``(0, 1]``. Ours.
        k_min (`int`, defaults to 2): least video blocks per video query row (``row_topk`` / ``row_topp``), >= 1.
            Ours: the reference has no floor.
        sink (`bool`, defaults to True): every video query row reads blocks holding latent frame 0, when some
            block holds none (with a single temporal tile row the sink would be every block). Ours. How many and
            which: ``sink_share``.
        sink_share (`float` or None, defaults to 0.125): the sink's share of the row's budget: each video query
            row keeps its ``floor(sink_share * budget)`` best frame-0 blocks by the draft map (the frame-0 blocks
            it already keeps count), inside the budget, so the sink costs at most that share and the map still
            chooses which frame-0 blocks (a budget under ``1 / sink_share`` blocks has no sink). ``None``: the
            former sink, every frame-0 block forced (at Wan 480p, tile 4x4x8, 50 of the 52 blocks of an 80%
            budget: a static mask; kept for comparisons). In ``(0, 1]``.
        same_frame (`bool`, defaults to False): every video query row reads all blocks of its own temporal tile
            row (its latent frame(s)); LightX2V's "per-frame diagonal", about one frame of blocks per row.
            Forced, counted inside the budget like the diagonal and the sink.
        pooling (`str`, defaults to ``"mean"``): a key of :data:`DRAFT_POOLINGS`.

    Budget: ``row_budget = min(Nv, max(k_min, ceil((1 - sparsity) * Nv)))`` video blocks per row, the product
    rounded to 9 decimals before the ceiling so that float round-off never adds a block.

    Dense warm-up steps and dense layers (docs/draft_attention.md#dense-warm-up: the reference keeps ~30% of steps and
    the first 1-2 blocks dense) belong to the shared dense policy (docs/composition.md#dense-policy), not to this
    config.
    """

    sparsity: float = 0.75
    selection: str = "row_topk"
    top_p: float = 0.9
    k_min: int = 2
    sink: bool = True
    sink_share: float | None = 0.125
    same_frame: bool = False
    pooling: str = "mean"

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s <= 1.0):
            raise ValueError(f"DraftAttentionConfig.sparsity: got {s!r}, expected a float in [0, 1] "
                             "(fraction of video x video blocks skipped).")
        if self.selection not in SELECTIONS:
            raise ValueError(f"DraftAttentionConfig.selection: got {self.selection!r}, expected one of "
                             f"{SELECTIONS}.")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"DraftAttentionConfig.top_p: got {p!r}, expected a float in (0, 1].")
        km = self.k_min
        if isinstance(km, bool) or not isinstance(km, int) or km < 1:
            raise ValueError(f"DraftAttentionConfig.k_min: got {km!r}, expected an int >= 1.")
        for name in ("sink", "same_frame"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DraftAttentionConfig.{name}: got {getattr(self, name)!r}, expected a bool.")
        object.__setattr__(self, "sink_share", check_share(
            self.sink_share, "DraftAttentionConfig", "sink_share",
            "e.g. sink_share=0.125 (an eighth of the budget), or None for every frame-0 block forced"))
        if not isinstance(self.pooling, str) or self.pooling not in DRAFT_POOLINGS:
            raise ValueError(f"DraftAttentionConfig.pooling: got {self.pooling!r}, expected one of "
                             f"{sorted(DRAFT_POOLINGS)}; add new ones with register_draft_pooling.")


def row_budget(num_video_blocks: int, sparsity: float, k_min: int) -> int:
    """Video blocks per video query row: ``min(Nv, max(k_min, keep_blocks(Nv, sparsity)))`` (the shared rule,
    :func:`~dit_sparse.methods.base.keep_blocks`)."""
    return min(num_video_blocks, max(k_min, keep_blocks(num_video_blocks, sparsity)))


def sink_blocks(layout: TokenLayout, config: DraftAttentionConfig) -> int:
    """Frame-0 blocks each video query row keeps under a ``sink_share`` sink: ``floor(sink_share * budget)``
    (:func:`~dit_sparse.methods.base.share_blocks`), at most the frame-0 block count; 0 without a sink (``sink``
    off, ``sink_share=None``: the forced sink instead, ``head_global``, or no block without frame 0). The map
    chooses which; the frame-0 blocks a row keeps anyway (its diagonal) count. Host-side, from the config and
    the layout alone."""
    if not config.sink or config.sink_share is None or config.selection == "head_global" \
            or not has_temporal_sink(layout):
        return 0
    nv = layout.num_video_blocks
    budget = row_budget(nv, config.sparsity, config.k_min)
    return min(share_blocks(budget, config.sink_share), _frame0_count(layout))


@tensor_cache(maxsize=64)
def _frame0_count(layout: TokenLayout) -> int:
    return int(frame0_blocks(layout, "cpu").sum())


@tensor_cache(maxsize=64)
def forced_row_max(layout: TokenLayout, config: DraftAttentionConfig) -> int:
    """Most forced video blocks of any video query row (:func:`forced_draft_mask`), on the host once per
    (layout, config)."""
    nv = layout.num_video_blocks
    return int(forced_draft_mask(layout, config, "cpu")[:nv, :nv].sum(-1).max()) if nv else 0


def check_forced_fits(layout: TokenLayout, config: DraftAttentionConfig) -> None:
    """Refuse a config whose forced blocks (diagonal, a ``sink_share=None`` sink, ``same_frame``) exceed the row
    budget on ``layout``: the map would choose nothing, and the "draft" selection would be a static mask. The
    message names the fix. ``head_global`` forces no video block."""
    if config.selection == "head_global":
        return
    nv = layout.num_video_blocks
    budget = row_budget(nv, config.sparsity, config.k_min)
    forced = forced_row_max(layout, config)
    if forced > budget:
        whole_sink = config.sink and config.sink_share is None and has_temporal_sink(layout)
        causes = [("the whole frame-0 sink (sink_share=None)", "sink_share=0.125 (an eighth of the budget, frame-0 "
                   "blocks chosen by the map) or sink=False")] if whole_sink else []
        if config.same_frame:
            causes.append(("same_frame=True", "same_frame=False"))
        what = " and ".join(c for c, _ in causes) or "the diagonal"
        fixes = ", ".join(f for _, f in causes)
        raise ValueError(
            f"DraftAttentionConfig(sparsity={config.sparsity}, k_min={config.k_min}) on {layout!r}: {forced} forced "
            f"video blocks per row ({what}) exceed the row budget of {budget} blocks, so the draft map would "
            f"choose nothing (a static mask); fix: {fixes + ', or ' if fixes else ''}a lower sparsity or a higher "
            f"k_min (a budget of at least {forced} blocks).")


def _check_qk(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout) -> None:
    if not isinstance(layout, TokenLayout):
        raise ValueError(f"layout must be a dit_sparse.TokenLayout, got {type(layout).__name__}.")
    check_permuted(q, layout, "query")
    check_permuted(k, layout, "key")
    if q.shape != k.shape:
        raise ValueError(f"query {tuple(q.shape)} and key {tuple(k.shape)} must have the same shape [B, P, H, D]; "
                         "for grouped-query attention repeat the key heads first.")
    if not (q.is_floating_point() and k.is_floating_point()):
        raise ValueError(f"query and key must be floating point, got {q.dtype} and {k.dtype}.")


def draft_map(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout, scale: float | None = None, *,
              pooling: str = "mean") -> torch.Tensor:
    r"""The draft attention map ``softmax_j(q̄_i · k̄_j · scale + log n_j)`` over video blocks.

    ``n_j`` is the number of real tokens of key block ``j`` (the tile size, less for partial edge tiles), so a
    block's draft mass is that of ``n_j`` copies of its mean key, as in the rectification estimate
    (docs/rectification.md#ipar). With every tile full the term is a constant and the map is the paper's
    ``softmax_j(q̄_i · k̄_j · scale)``.

    Args:
        q_perm (`torch.Tensor`): permuted queries ``[B, P, H, D]`` (``layout.permute(q)``, after RoPE/QK-norm).
        k_perm (`torch.Tensor`): permuted keys ``[B, P, H, D]``.
        layout (`TokenLayout`): the layout that permuted them.
        scale (`float`, *optional*): softmax scale, defaults to ``1 / sqrt(D)`` (as the reference).
        pooling (`str`, defaults to ``"mean"``): a key of :data:`DRAFT_POOLINGS`.

    Returns:
        float32 ``[B, H, Nv, Nv]``; every row sums to 1. Text blocks are excluded (they are always read).
    """
    _check_qk(q_perm, k_perm, layout)
    if pooling not in DRAFT_POOLINGS:
        raise ValueError(f"draft_map: pooling={pooling!r} is unknown, expected one of {sorted(DRAFT_POOLINGS)}.")
    scale = 1.0 / math.sqrt(q_perm.shape[-1]) if scale is None else float(scale)
    logits = DRAFT_POOLINGS[pooling](q_perm, k_perm, layout, scale).float()
    # a key block stands for its n_j real tokens: + log n_j (matters only for partial edge tiles; as
    # docs/rectification.md#ipar)
    log_n = layout.block_valid(logits.device)[: layout.num_video_blocks].to(torch.float32).log()
    return torch.softmax(logits + log_n, dim=-1)


def forced_draft_mask(layout: TokenLayout, config: DraftAttentionConfig,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """Blocks the selection always keeps, bool ``[N, N]`` (independent of the data).

    Text rows and text columns always. For ``row_topk`` / ``row_topp`` also the diagonal, with
    ``sink_share=None`` the whole sink (blocks holding latent frame 0, i.e. the tiles of temporal tile index 0,
    when some block holds none and ``config.sink``; a ``sink_share`` sink is chosen by the map, not forced:
    :func:`sink_blocks`) and, with ``config.same_frame``, every block whose frame range overlaps the query block's
    (its temporal tile row, for tiles; packed edge blocks by their bounding boxes). ``head_global`` reproduces the
    reference, which forces no video block: only text.
    """
    if config.selection == "head_global":
        return forced_mask(layout, diagonal=False, sink=False, device=device)
    m = forced_mask(layout, diagonal=True, sink=config.sink and config.sink_share is None, device=device)
    if config.same_frame:
        nv = layout.num_video_blocks
        m[:nv, :nv] |= frame_overlap_mask(layout, device)
    return m


def _keep_top(scores: torch.Tensor, eligible: torch.Tensor, need: torch.Tensor, kmax: int) -> torch.Tensor:
    """Per row, the ``need`` largest eligible scores; among equal scores the lower column index wins.

    ``scores`` float ``[B, H, R, C]``; ``eligible`` bool broadcastable to it; ``need`` int64 broadcastable to
    ``[B, H, R]`` with ``need <= kmax`` and ``need <=`` the eligible count of its row. One ``topk`` (values
    only, which are tie-independent) finds the need-th value; ties at it are resolved by a column cumsum.
    """
    s = scores.masked_fill(~eligible, float("-inf"))
    k = min(kmax, s.shape[-1])
    need = need.expand(s.shape[:-1]).unsqueeze(-1)  # [B, H, R, 1]
    if k <= 0:
        return torch.zeros_like(s, dtype=torch.bool)
    top = s.topk(k, dim=-1, largest=True, sorted=True).values
    thr = top.gather(-1, (need - 1).clamp(0, k - 1))
    above = s > thr
    tie = s == thr
    take = need - above.sum(-1, keepdim=True)
    keep = above | (tie & (tie.to(torch.int32).cumsum(-1, dtype=torch.int32) <= take))
    return keep & (need > 0)


def _topp_counts(draft: torch.Tensor, forced_v: torch.Tensor, top_p: float, k_min: int,
                 budget: int) -> torch.Tensor:
    """Per-row video block counts for ``row_topp`` (int64 ``[B, H, Nv]``); see :func:`draft_select`."""
    nf = forced_v.sum(-1)  # [Nv]
    if top_p >= 1.0:  # the full mass needs every block: the budget caps it
        return torch.full(draft.shape[:-1], budget, dtype=torch.long, device=draft.device)
    a = draft.double()
    # forced mass first (index order), then non-forced blocks by decreasing draft value (ties: lower index first);
    # one sequential cumsum so the float64 rounding is that of a plain left-to-right sum
    forced_vals = a * forced_v
    rest = torch.sort(a.masked_fill(forced_v, float("-inf")), dim=-1, descending=True, stable=True).values
    rest = torch.where(torch.isfinite(rest), rest, torch.zeros_like(rest))
    mass = torch.cat([forced_vals, rest], -1).cumsum(-1)  # [B, H, Nv, 2 Nv]
    before = mass[..., forced_vals.shape[-1] - 1:-1]  # mass kept before each non-forced candidate
    in_rest = torch.arange(rest.shape[-1], device=draft.device) < (rest.shape[-1] - nf).unsqueeze(-1)  # [Nv, Nv]
    n_rest = ((before < top_p) & in_rest).sum(-1)
    return (nf + n_rest).clamp(min=k_min, max=budget)


def _head_global(draft: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The reference's ``attention_percentile_mask_headwise``: per head, keep ``A >= τ`` where τ is the
    ``int(s * Nv²)``-th smallest probability (ties kept); keep all when that count is 0, none when it is ``Nv²``."""
    b, h, nv, _ = draft.shape
    n = nv * nv
    r = 1.0 - sparsity
    k_drop = int((1.0 - r) * n)  # exactly the reference's arithmetic
    if k_drop == 0:
        return torch.ones_like(draft, dtype=torch.bool)
    if k_drop >= n:
        return torch.zeros_like(draft, dtype=torch.bool)
    thr = draft.reshape(b, h, n).kthvalue(k_drop, dim=-1).values
    return draft >= thr.view(b, h, 1, 1)


def draft_select(draft: torch.Tensor, layout: TokenLayout, config: DraftAttentionConfig) -> torch.Tensor:
    r"""Block mask from a draft map.

    Args:
        draft (`torch.Tensor`): float ``[B, H, Nv, Nv]`` (:func:`draft_map`).
        layout (`TokenLayout`): the layout of the call.
        config (`DraftAttentionConfig`): the selection rule and its knobs.

    Returns:
        bool ``[B, H, N, N]``: text rows and text columns on; video x video blocks as selected.

    Selection per (b, h, video query block i), with ``F`` = forced video blocks of row i
    (:func:`forced_draft_mask`) and ``budget = row_budget(Nv, sparsity, k_min)``:

    * ``row_topk``: keep ``F`` plus the ``budget - |F|`` non-forced blocks with the largest ``A[b, h, i, :]``
      (none if ``|F| >= budget``). With a ``sink_share`` sink (:func:`sink_blocks` = ``s > 0``) the first
      ``s - |F ∩ frame0|`` of them are the row's largest non-forced frame-0 entries, the rest the largest of
      all other blocks.
    * ``row_topp``: the forced mass ``m_F = Σ_{j∈F} A[i, j]`` counts first; non-forced blocks are then taken by
      decreasing ``A`` while the mass kept before each is ``< top_p``; the total count ``|F| + taken`` is
      clamped to ``[k_min, budget]`` and filled as in ``row_topk`` (forced blocks are never dropped: if
      ``|F| >= budget`` only ``F`` is kept). Masses are summed in float64. ``top_p = 1`` gives the budget. The
      sink takes its frame-0 blocks out of that count, as in ``row_topk``.

    A config whose forced blocks exceed the budget is refused (:func:`check_forced_fits`).
    * ``head_global``: the reference (see :func:`_head_global`); no forced video blocks, no floor.

    Ties: among equal draft values the lower key block index wins, so the selection is deterministic.
    """
    if draft.dim() != 4 or draft.shape[-1] != draft.shape[-2] or draft.shape[-1] != layout.num_video_blocks:
        raise ValueError(f"draft must be [B, H, Nv, Nv] with Nv={layout.num_video_blocks} for {layout!r}, got "
                         f"{tuple(draft.shape)}.")
    b, h, nv, _ = draft.shape
    n = layout.num_blocks
    check_forced_fits(layout, config)
    forced = forced_draft_mask(layout, config, draft.device)
    forced_v = forced[:nv, :nv]
    if config.selection == "head_global":
        video = _head_global(draft, config.sparsity)
    else:
        budget = row_budget(nv, config.sparsity, config.k_min)
        nf = forced_v.sum(-1)  # [Nv]
        if config.selection == "row_topk":
            count = torch.full_like(nf, budget)
        else:
            count = _topp_counts(draft, forced_v, config.top_p, config.k_min, budget)
        need = (count - nf).clamp(min=0)
        eligible = ~forced_v
        video = forced_v
        quota = sink_blocks(layout, config)
        if quota:  # the sink: the row's best frame-0 blocks first, inside its count
            f0 = frame0_blocks(layout, draft.device)
            f0_free = eligible & f0.view(1, nv)
            have = (forced_v & f0.view(1, nv)).sum(-1)
            need_sink = torch.minimum((quota - have).clamp(min=0), f0_free.sum(-1))
            need_sink = torch.minimum(need_sink, need)
            sink = _keep_top(draft, f0_free, need_sink, quota)
            video = video | sink
            eligible = eligible & ~sink
            need = need - need_sink
        video = _keep_top(draft, eligible, need, budget) | video
    mask = forced.expand(b, h, n, n).clone()
    mask[..., :nv, :nv] |= video
    return mask


def draft_mask(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout, config: DraftAttentionConfig,
               scale: float | None = None) -> torch.Tensor:
    r"""DraftAttention block mask from permuted q and k.

    Args:
        q_perm (`torch.Tensor`): permuted queries ``[B, P, H, D]`` (after RoPE and QK-norm).
        k_perm (`torch.Tensor`): permuted keys ``[B, P, H, D]``.
        layout (`TokenLayout`): the layout that permuted them.
        config (`DraftAttentionConfig`): selection knobs.
        scale (`float`, *optional*): draft softmax scale, defaults to ``1 / sqrt(D)``.

    Returns:
        bool ``[B, H, N, N]`` (see :func:`draft_select`).
    """
    if not isinstance(config, DraftAttentionConfig):
        raise ValueError(f"config must be a DraftAttentionConfig, got {type(config).__name__}.")
    return draft_select(draft_map(q_perm, k_perm, layout, scale, pooling=config.pooling), layout, config)


def draft_plan(q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout, config: DraftAttentionConfig,
               scale: float | None = None) -> SparsePlan:
    """:func:`draft_mask` as a :class:`~dit_sparse.SparsePlan` over the permuted sequence (``plan.density`` is
    the achieved density, forced blocks and text included)."""
    return plan_from_mask(draft_mask(q_perm, k_perm, layout, config, scale), layout)
