"""One config that composes the four methods into ONE plan per attention call, plus the shared dense policy.

Every method produces the same currency (a block mask, then a :class:`~dit_sparse.SparsePlan`), so they combine:

* **selection** = union of the enabled selectors: draft guidance, neighbourhood window; pooled rectification
  selects only when neither of those is enabled (otherwise it only corrects their selection);
* **epilogue** = pooled rectification ``(R, c)`` for the final mask, *or* Re-ttention ``(rho + λΔt, residual)``
  (both correct the softmax denominator: the config refuses to enable both,
  docs/composition.md#rectification-and-re-ttention-do-not-combine);
* **reuse** = the plan (and Re-ttention statistics) kept for ``refresh_period`` steps per (layer, branch);
* **dense policy** = warm-up steps, chosen layers and heads, small calls, or everything dense.

Example::

    config = SparseAttentionConfig(
        draft=DraftAttentionConfig(sparsity=0.9),
        neighborhood=NeighborhoodConfig(window=(1, 3, 3)),
        rectification=PooledRectificationConfig(),
        reuse=TemporalReuseConfig(refresh_period=5, retention=False),
        dense=DensePolicy(dense_fraction=0.2, dense_layers=(0,)),
    )
    engine = SparseAttention(config)
    out = engine(q, k, v, layout=layout, step=step, num_steps=50, layer=3, branch="cond")
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._cache import tensor_cache
from ..backends import BACKENDS
from ..backends.break_even import sparse_break_even
from ..layout import PACKINGS, TokenLayout
from ..ops import block_sparse_attention
from ..plan import SparsePlan
from ..segment import PooledSegment
from .base import plan_from_mask
from .draft_attention import DraftAttentionConfig, draft_mask
from .neighborhood import NeighborhoodConfig, neighborhood_mask
from .pooled_rectification import (
    CallStatistics,
    PooledRectificationConfig,
    pooled_segment,
    rectification_terms,
    row_rectified_attention,
    select_critical_blocks,
)
from .temporal_reuse import ReuseCache, TemporalReuseConfig, reuse_attention

__all__ = ["DensePolicy", "SparseAttentionConfig", "SparseAttention", "dense_attention", "plan_row_bound"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_set(value, name: str) -> frozenset[int]:
    iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
    items = list(value) if iterable else None
    if items is None or not all(_is_int(v) for v in items):
        hint = f"{name}=({value!r},)" if _is_int(value) else f"{name}=(0, 1)"
        raise ValueError(f"DensePolicy.{name}: got {value!r}, expected a collection of ints; fix: e.g. {hint}.")
    out = frozenset(items)
    if any(v < 0 for v in out):
        raise ValueError(f"DensePolicy.{name}: got {value!r}, expected indices >= 0; fix: drop the negative "
                         "ones (indices count from the first layer / head).")
    return out


@dataclass(frozen=True, kw_only=True)
class DensePolicy:
    """What stays dense, shared by every method (docs/composition.md#dense-policy). Steps are step *indices*, never
    timesteps.

    Args:
        dense_steps (`int`, defaults to 0): the first ``dense_steps`` denoising steps run dense.
        dense_fraction (`float`, defaults to 0.0): the first ``ceil(fraction * num_steps)`` steps run dense
            (needs ``num_steps`` at call time; the larger of the two rules wins).
        dense_layers (`frozenset[int]`): layer indices (per transformer) that always run dense.
        dense_heads (`frozenset[int]`): heads whose plan rows are all on (they still run in the sparse op).
        min_tokens (`int` or ``"auto"``, defaults to 0): calls with fewer video tokens run dense. ``"auto"``: the
            break-even measured for the call's device (:func:`~dit_sparse.backends.break_even.sparse_break_even`:
            below it dense SDPA is faster than the sparse op); 0 on a device with no measurement. The presets use
            ``"auto"``.
        force_dense (`bool`, defaults to False): everything dense: must equal stock attention.
    """

    dense_steps: int = 0
    dense_fraction: float = 0.0
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    dense_heads: frozenset[int] = field(default_factory=frozenset)
    min_tokens: int | str = 0
    force_dense: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.dense_steps) or self.dense_steps < 0:
            raise ValueError(f"DensePolicy.dense_steps: got {self.dense_steps!r}, expected an int >= 0 (leading "
                             "denoising steps run dense); fix: e.g. dense_steps=5, or 0 for none.")
        f = self.dense_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise ValueError(f"DensePolicy.dense_fraction: got {f!r}, expected a float in [0, 1] (share of leading "
                             "steps run dense); fix: e.g. dense_fraction=0.2.")
        if self.min_tokens != "auto" and (not _is_int(self.min_tokens) or self.min_tokens < 0):
            raise ValueError(f"DensePolicy.min_tokens: got {self.min_tokens!r}, expected an int >= 0 or \"auto\" "
                             "(calls with fewer video tokens run dense; auto: the device's measured break-even); "
                             "fix: e.g. min_tokens=4096, \"auto\", or 0 for none.")
        if not isinstance(self.force_dense, bool):
            raise ValueError(f"DensePolicy.force_dense: got {self.force_dense!r}, expected a bool; fix: "
                             "force_dense=True or False.")
        object.__setattr__(self, "dense_layers", _int_set(self.dense_layers, "dense_layers"))
        object.__setattr__(self, "dense_heads", _int_set(self.dense_heads, "dense_heads"))

    def warmup_steps(self, num_steps: int | None) -> int:
        """Number of leading dense steps for a run of ``num_steps``."""
        frac = 0 if num_steps is None else math.ceil(round(self.dense_fraction * num_steps, 9))
        return max(self.dense_steps, frac)

    def token_floor(self, device_type: str | None) -> int:
        """The ``min_tokens`` in force on ``device_type`` (``"auto"`` resolved; 0 where nothing was measured)."""
        if self.min_tokens != "auto":
            return self.min_tokens
        if device_type is None:
            raise ValueError("DensePolicy(min_tokens=\"auto\") needs the call's device to look up its break-even; "
                             "pass device_type= (e.g. query.device.type), or set min_tokens to an int.")
        measured = sparse_break_even(device_type)
        return 0 if measured is None else measured

    def is_dense(self, *, step: int | None, num_steps: int | None, layer: int | None, video_tokens: int,
                 device_type: str | None = None) -> bool:
        """True when this call runs dense (``device_type``: the call's device, for ``min_tokens="auto"``)."""
        if self.force_dense or video_tokens < self.token_floor(device_type):
            return True
        if layer is not None and layer in self.dense_layers:
            return True
        if self.dense_fraction > 0 and num_steps is None and step is not None:
            raise ValueError("DensePolicy.dense_fraction needs num_steps; pass num_steps= (the pipeline's "
                             "num_inference_steps) or use dense_steps instead.")
        return step is not None and step < self.warmup_steps(num_steps)


@dataclass(frozen=True, kw_only=True)
class SparseAttentionConfig:
    """The four methods composed into one plan per call. At least one selector unless everything is dense.

    Args:
        draft (`DraftAttentionConfig`, *optional*): draft-guided block selection.
        neighborhood (`NeighborhoodConfig`, *optional*): local 3-D window (union with draft).
        rectification (`PooledRectificationConfig`, *optional*): pooled rectification; selects blocks itself only
            when ``draft`` and ``neighborhood`` are both None, else corrects their selection.
        reuse (`TemporalReuseConfig`, *optional*): plan reuse across steps and Re-ttention.
        dense (`DensePolicy`): the dense safety valves.

    Other Parameters:
        tile (`tuple[int, int, int]`, *optional*): tile of the :class:`~dit_sparse.TokenLayout` (default: picked).
        block_size (`int`, defaults to 128): block size when the tile is picked.
        packing (`str`, defaults to ``"packed"``): :class:`~dit_sparse.TokenLayout` packing: ``"packed"`` (edge
            tiles packed into full blocks, under one block of padding) or ``"tiled"`` (one padded block per tile).
        backend (`str`, *optional*): attention backend (see :func:`dit_sparse.block_sparse_attention`).
    """

    draft: DraftAttentionConfig | None = None
    neighborhood: NeighborhoodConfig | None = None
    rectification: PooledRectificationConfig | None = None
    reuse: TemporalReuseConfig | None = None
    dense: DensePolicy = field(default_factory=DensePolicy)
    tile: tuple[int, int, int] | None = None
    block_size: int = 128
    packing: str = "packed"
    backend: str | None = None

    def __post_init__(self) -> None:
        for name, cls in (("draft", DraftAttentionConfig), ("neighborhood", NeighborhoodConfig),
                          ("rectification", PooledRectificationConfig), ("reuse", TemporalReuseConfig),
                          ("dense", DensePolicy)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise ValueError(f"SparseAttentionConfig.{name}: got a {type(v).__name__} ({v!r}), expected a "
                                 f"{cls.__name__} or None; fix: {name}={cls.__name__}(...).")
        if self.dense is None:
            object.__setattr__(self, "dense", DensePolicy())
        if not self.dense.force_dense and not self.selectors:
            raise ValueError("SparseAttentionConfig needs a selector: draft=, neighborhood= or rectification= "
                             "(or dense=DensePolicy(force_dense=True) for stock attention).")
        if self.rectification is not None and self.rectification.rectify and self.reuse is not None \
                and self.reuse.retention:
            raise NotImplementedError(
                "Pooled rectification and Re-ttention both correct the softmax denominator of the same sparse "
                "output and are not combined (docs/composition.md#rectification-and-re-ttention-do-not-combine). "
                "Use TemporalReuseConfig(retention=False) to reuse plans with rectification, or drop rectification "
                "to use Re-ttention.")
        if self.neighborhood is not None and self.neighborhood.exact:
            raise NotImplementedError(
                "NeighborhoodConfig(exact=True) applies a token-level element mask that only the torch path "
                "runs (dit_sparse.methods.neighborhood.neighborhood_attention); the composite runs block plans. "
                "Use exact=False here (block-rounded window, a superset of the token window).")
        if not isinstance(self.packing, str) or self.packing not in PACKINGS:
            raise ValueError(f"SparseAttentionConfig.packing: got {self.packing!r}, expected one of {PACKINGS}; fix: "
                             "packing='packed' (default) or 'tiled'.")
        if not _is_int(self.block_size) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"SparseAttentionConfig.block_size: got {self.block_size!r}, expected a power of two "
                             ">= 16 (tokens per kernel block); fix: e.g. block_size=128 (64 for small grids).")
        if self.tile is not None:
            t = self.tile
            if not (isinstance(t, (tuple, list)) and len(t) == 3 and all(_is_int(v) and v >= 1 for v in t)):
                raise ValueError(f"SparseAttentionConfig.tile: got {t!r}, expected three ints >= 1 (tT, tH, tW) in "
                                 "latent tokens; fix: e.g. tile=(1, 8, 16), or tile=None to pick one per grid.")
            object.__setattr__(self, "tile", tuple(t))
        if self.backend is not None:
            if self.backend not in BACKENDS:
                raise ValueError(f"SparseAttentionConfig.backend: got {self.backend!r}, expected None (automatic) "
                                 f"or one of {sorted(BACKENDS)}; fix: backend=None, or e.g. backend='triton'.")
            volume = self.block_size if self.tile is None else self.tile[0] * self.tile[1] * self.tile[2]
            if self.backend == "triton" and volume % 16:
                raise ValueError(f"SparseAttentionConfig.tile: got {self.tile!r} ({volume} tokens per block), "
                                 "expected a multiple of 16 tokens per block with backend='triton' (tl.dot); fix: a "
                                 "tile whose product is 16, 32, 64 or 128, or backend='torch'.")

    @property
    def selectors(self) -> tuple[str, ...]:
        return tuple(n for n in ("draft", "neighborhood", "rectification") if getattr(self, n) is not None)

    def layout(self, frames: int, height: int, width: int, text_tokens: int = 0,
               text_position: str = "after") -> TokenLayout:
        return TokenLayout(frames=frames, height=height, width=width, text_tokens=text_tokens,
                           text_position=text_position, tile=self.tile, block_size=self.block_size,
                           packing=self.packing)


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Stock attention on ``[B, S, H, D]`` (what diffusers runs): SDPA with the model's scale."""
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                         scale=scale)
    return out.transpose(1, 2)


def _check_heads(heads: int, head_offset: int, total_heads: int | None) -> int:
    """``total_heads`` (default ``heads``) after checking that ``[head_offset, head_offset + heads)`` fits in it."""
    total = heads if total_heads is None else total_heads
    if isinstance(head_offset, bool) or not isinstance(head_offset, int) or head_offset < 0 \
            or head_offset + heads > total:
        raise ValueError(f"head_offset={head_offset!r} with {heads} heads does not fit in total_heads={total!r}: "
                         "the call must hold heads head_offset ... head_offset + H - 1 of total_heads.")
    return total


@tensor_cache(maxsize=64)
def _head_rows(dense_heads: tuple[int, ...], heads: int, device: str) -> torch.Tensor:
    """Bool ``[heads]``: True for the heads whose plan rows are all on."""
    return torch.isin(torch.arange(heads), torch.tensor(dense_heads)).to(device)


@tensor_cache(maxsize=64)
def plan_row_bound(config: SparseAttentionConfig, layout: TokenLayout, dense_heads: tuple[int, ...]) -> int:
    """Most key blocks any plan row of ``config`` can read on ``layout``, from the config and the layout alone.

    A bound known without the data lets a cached plan keep only that many columns of ``kv_indices`` (temporal
    reuse; :attr:`SparsePlan.kv_indices` may be narrower than ``Mk``). ``Mk`` (no bound) when a row can read
    everything or its count depends on the data: text query rows (dense), ``dense_heads`` in the call, draft
    ``head_global``, rectification as the selector (its top-p count, and rows short of ``top_p``). Otherwise the
    draft rows' ``max(budget, forced video blocks)`` (``row_topk`` and ``row_topp`` keep at most the budget
    beyond their forced blocks) plus the widest neighbourhood row. Computed on the host once per (config,
    layout): the forced and window masks are static.
    """
    from .draft_attention import forced_draft_mask, row_budget

    n, nv = layout.num_blocks, layout.num_video_blocks
    if layout.num_text_blocks or dense_heads or config.dense.force_dense:
        return n
    if config.draft is None and config.neighborhood is None:  # rectification selects: data-dependent counts
        return n
    total = 0
    draft = config.draft
    if draft is not None:
        if draft.selection == "head_global":
            return n
        forced = int(forced_draft_mask(layout, draft)[:nv, :nv].sum(-1).max())
        total += max(row_budget(nv, draft.sparsity, draft.k_min), forced)
    if config.neighborhood is not None:
        total += int(neighborhood_mask(layout, config.neighborhood)[..., :nv, :].sum(-1).max())
    return max(1, min(n, total))


class SparseAttention:
    """Runs one attention call under a :class:`SparseAttentionConfig`, with per-(layer, branch) reuse state.

    ``__call__`` takes ``[B, S, H, D]`` tensors in **model order** (video + text as the model lays them out) and
    returns the output in model order. ``stats`` records, per layer, the achieved density of the last plan.
    """

    def __init__(self, config: SparseAttentionConfig):
        if not isinstance(config, SparseAttentionConfig):
            raise ValueError(f"SparseAttention needs a SparseAttentionConfig, got {type(config).__name__}.")
        self.config = config
        self.reuse_cache = ReuseCache(config.reuse) if config.reuse is not None else None
        self._densities: dict[Hashable, torch.Tensor | float] = {}

    def reset(self) -> None:
        """Forget all per-layer state (call at the start of every generation)."""
        if self.reuse_cache is not None:
            self.reuse_cache.reset()
        self._densities.clear()

    # ------------------------------------------------------------------ planning
    def build_mask(self, q_perm: torch.Tensor, k_perm: torch.Tensor, layout: TokenLayout,
                   scale: float | None = None, rect_stats=None, *, head_offset: int = 0,
                   total_heads: int | None = None) -> torch.Tensor:
        """The union of the enabled selectors, bool ``[B|1, H|1, N, N]`` (dense heads switched fully on).

        ``rect_stats``: a callable returning this call's ``(BlockStatistics, P̃)`` (shared with the epilogue, so
        pooling runs once per call). ``head_offset`` / ``total_heads``: the tensors hold the model's heads
        ``head_offset ... head_offset + H - 1`` of ``total_heads`` (context parallelism: see :meth:`__call__`).
        """
        cfg = self.config
        heads = q_perm.shape[2]
        total = _check_heads(heads, head_offset, total_heads)
        mask = None
        if cfg.draft is not None:
            mask = draft_mask(q_perm, k_perm, layout, cfg.draft, scale)
        if cfg.neighborhood is not None:
            nb = neighborhood_mask(layout, cfg.neighborhood, q_perm.device)
            if total != heads and nb.shape[1] == total:  # per-head windows of all the model's heads: ours
                nb = nb[:, head_offset:head_offset + heads]
            mask = nb if mask is None else mask | nb
        if mask is None:  # rectification is the only selector
            if rect_stats is None:
                rect_stats = CallStatistics(q_perm, k_perm, None, layout, cfg.rectification, scale)
            mask = select_critical_blocks(rect_stats()[1], layout, cfg.rectification)
        dense_heads = tuple(sorted(h - head_offset for h in cfg.dense.dense_heads
                                   if head_offset <= h < head_offset + heads))
        if dense_heads:  # a cached device tensor: no host-to-device index copy per call (CUDA-graph safe)
            mask = mask | _head_rows(dense_heads, heads, str(mask.device)).view(1, heads, 1, 1)
        return mask

    def _rectify(self, q_perm, k_perm, v_perm, layout, stats: CallStatistics):
        rect = self.config.rectification
        if rect is None or not rect.rectify or rect.per_row:  # per row: a pooled segment in the kernel
            return None

        def epilogue(plan: SparsePlan) -> SparsePlan:
            st, p_tilde = stats()
            r, c = rectification_terms(q_perm, k_perm, v_perm, layout, plan.to_dense(), rect, stats.scale,
                                       stats=st, p_tilde=p_tilde)
            return plan.with_epilogue(out_scale=r, out_bias=c.transpose(1, 2))

        return epilogue

    # ------------------------------------------------------------------ call
    def runs_dense(self, *, step: int | None, num_steps: int | None, layer: Hashable, video_tokens: int,
                   device_type: str | None = None) -> bool:
        """True when a call at ``step`` of ``num_steps`` in ``layer`` over ``video_tokens`` video tokens runs dense
        under the config's :class:`DensePolicy` (warm-up steps, dense layers, too few tokens, ``force_dense``).

        The one place that decision is made, asked once per call: by :meth:`__call__`, or by the diffusers
        processors, which then run the model's stock attention or :meth:`sparse_attention`. Only an int ``layer``
        can match ``dense_layers``.
        """
        layer_index = layer if isinstance(layer, int) else None
        return self.config.dense.is_dense(step=step, num_steps=num_steps, layer=layer_index,
                                          video_tokens=video_tokens, device_type=device_type)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, layout: TokenLayout,
                 step: int | None = None, num_steps: int | None = None, layer: Hashable = None,
                 branch: Hashable = None, scale: float | None = None, head_offset: int = 0,
                 total_heads: int | None = None) -> torch.Tensor:
        """Attention of ``[B, S, H, D]`` q/k/v in model order under the config; returns ``[B, S, H, D]``.

        Dense (:func:`dense_attention`) when :meth:`runs_dense` says so, else :meth:`sparse_attention`.
        ``head_offset`` and ``total_heads`` (context parallelism, :mod:`dit_sparse.integration.parallel`): the
        tensors hold the model's heads ``head_offset ... head_offset + H - 1`` of ``total_heads`` (default: all
        ``H`` heads), so per-head settings (``DensePolicy.dense_heads``, per-head neighbourhood windows) apply to
        the global heads.
        """
        if self.runs_dense(step=step, num_steps=num_steps, layer=layer, video_tokens=layout.num_video_tokens,
                           device_type=query.device.type):
            _check_heads(query.shape[2], head_offset, total_heads)
            self._densities[layer] = 1.0
            return dense_attention(query, key, value, scale)
        return self.sparse_attention(query, key, value, layout=layout, step=step, layer=layer, branch=branch,
                                     scale=scale, head_offset=head_offset, total_heads=total_heads)

    def sparse_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                         layout: TokenLayout, step: int | None = None, layer: Hashable = None,
                         branch: Hashable = None, scale: float | None = None, head_offset: int = 0,
                         total_heads: int | None = None) -> torch.Tensor:
        """The sparse path of :meth:`__call__`, for a caller that has asked :meth:`runs_dense` already (the
        diffusers processors, whose dense calls run the model's stock attention instead). Same arguments."""
        cfg = self.config
        _check_heads(query.shape[2], head_offset, total_heads)
        qp, kp, vp = (layout.permute(t) for t in (query, key, value))
        rect_cfg = cfg.rectification
        stats = None if rect_cfg is None else CallStatistics(qp, kp, vp, layout, rect_cfg, scale)
        epilogue = self._rectify(qp, kp, vp, layout, stats)

        def build() -> torch.Tensor:
            return self.build_mask(qp, kp, layout, scale, stats, head_offset=head_offset, total_heads=total_heads)

        if self.reuse_cache is not None:
            state = self.reuse_cache.get(layer, branch)
            segment = None
            if cfg.rectification is not None and cfg.rectification.per_row:
                def segment(plan: SparsePlan) -> PooledSegment:  # fresh pooled keys each step, reused plan
                    return pooled_segment(layout, plan.to_dense(), cfg.rectification, stats=stats()[0])
            dense_heads = tuple(sorted(h for h in cfg.dense.dense_heads
                                       if head_offset <= h < head_offset + query.shape[2]))
            out = reuse_attention(qp, kp, vp, layout, step=0 if step is None else step, state=state,
                                  config=cfg.reuse, build_mask=build, scale=scale, backend=cfg.backend,
                                  epilogue=epilogue, segment=segment,
                                  plan_width=plan_row_bound(cfg, layout, dense_heads))
            if state.mask is not None:
                self._densities[layer] = state.mask
        else:
            mask = build()
            rect = cfg.rectification
            if rect is not None and rect.per_row:
                out = row_rectified_attention(qp, kp, vp, layout, mask, rect, stats.scale, stats=stats()[0],
                                              backend=cfg.backend)
            else:
                plan = plan_from_mask(mask, layout)
                if epilogue is not None:
                    plan = epilogue(plan)
                out = block_sparse_attention(qp, kp, vp, plan, scale=scale, backend=cfg.backend)
            self._densities[layer] = mask
        return layout.unpermute(out)

    # ------------------------------------------------------------------ reporting
    def masks(self) -> dict[Hashable, torch.Tensor]:
        """``{layer: bool block mask [B|1, H|1, N, N]}`` of each layer's last sparse call (CPU copies)."""
        return {k: v.detach().cpu() for k, v in self._densities.items() if torch.is_tensor(v)}

    @property
    def stats(self) -> dict[Hashable, float]:
        """``{layer: fraction of block pairs read in its last call}`` (1.0 for dense calls)."""
        return {k: (v if isinstance(v, float) else float(v.float().mean())) for k, v in self._densities.items()}
