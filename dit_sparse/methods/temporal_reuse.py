"""Temporal reuse across denoising steps: sparse-plan reuse and Re-ttention (docs/temporal_reuse.md).

Two ideas that share one per-(layer, branch) state:

* **Plan reuse** (docs/temporal_reuse.md#plan-reuse, [ours], after AdaSpa / SVG2): the block mask changes slowly across
  denoising steps, so build it once and reuse it until ``step - built_step >= refresh_period``, until the pooled
  queries drift (``mean_h (1 - cos(q̄_t, q̄_ref)) > drift_threshold``), or until the layout or shapes change. What this
  saves is the mask source's work (draft map, top-k, CSR build).
* **Re-ttention** (docs/temporal_reuse.md#re-ttention, arXiv 2505.22918, NeurIPS 2025; cccrrrccc/Re-ttention): at very
  high sparsity the damage comes mostly from the softmax denominator shift. At a *cache step* (every plan rebuild) run
  dense and sparse attention on the same q, k, v, output the exact dense result and cache, per row,

  ``rho = exp(LSE_sparse - LSE_full)`` (the kept share of the softmax mass, fp32 ``[B, H, P]``) and
  ``R = O_full - rho * O_sparse`` (the exact contribution of the masked keys, ``[B, P, H, D]``).

  At a later sparse step, ``Δt = step - cache_step`` steps on, output
  ``O_t = (rho + λ·Δt) · O_sparse,t + R`` (λ = ``ratio_slope`` = 0.04 in the paper). Both terms run in the
  attention op's epilogue (``SparsePlan.out_scale`` / ``out_bias``), so a sparse step costs one sparse call.

A plan rebuild always forces a Re-ttention cache step: ``rho`` and ``R`` are only valid for the mask they were
measured with (docs/temporal_reuse.md#interplay-with-plan-rebuilds).

State is keyed by (layer, branch) in a :class:`ReuseCache` (diffusers' ``cache_context`` names "cond", "uncond",
"cond_uncond"), and must be reset at the start of every generation (:meth:`ReuseCache.reset`). Steps are denoising
step *indices* (docs/composition.md#steps-and-branches), never timestep values.

Shapes: B batch, P = ``layout.padded_len`` (permuted sequence), H heads, D head dim, N = ``layout.num_blocks``.

Example::

    config = TemporalReuseConfig(refresh_period=5)
    cache = ReuseCache(config)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    out = reuse_attention(qp, kp, vp, layout, step=step, state=cache.get(layer_idx, "cond"), config=config,
                          build_mask=lambda: my_method_mask(qp, kp, layout))
    out = layout.unpermute(out)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .._env import checks_enabled
from .._logging import warn_once
from ..layout import TokenLayout
from ..ops import block_sparse_attention, dense_attention_lse
from ..plan import SparsePlan
from ..segment import PooledSegment
from .base import check_permuted, plan_from_mask, pool_blocks

__all__ = [
    "TemporalReuseConfig",
    "TemporalReuseState",
    "ReuseCache",
    "reuse_attention",
    "retention_terms",
    "pooled_query_drift",
]

_RESIDUAL_DTYPES = tuple(d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                     getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None))
                         if d is not None)
#: dtypes the attention kernels load as an epilogue bias as is; others (fp8) are upcast per sparse step
_BIAS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class TemporalReuseConfig:
    """Plan reuse across denoising steps, optionally with Re-ttention's ratio and residual correction.

    Args:
        refresh_period (`int`, defaults to 5): rebuild the plan when ``step - built_step >= refresh_period``.
            ``1`` rebuilds every step (no reuse). Re-ttention's schedule is a cache step every 5 steps [ref].
        retention (`bool`, defaults to True): Re-ttention. Every plan rebuild is a cache step (dense + sparse
            attention, exact dense output, caches ``rho`` and ``R``); the steps in between output
            ``(rho + ratio_slope * Δt) * O_sparse + R``. False: plain sparse attention with the reused plan.
        ratio_slope (`float`, defaults to 0.04): λ, the per-step growth of the cached ratio [ref: paper Table 3,
            HPSv2 27.72 at λ = 0.04 vs 27.46 at λ = 0]. Must be >= 0.
        clamp_ratio (`bool`, defaults to False): clamp ``rho + λ·Δt`` to at most 1. The reference does not.
        store_residual (`bool`, defaults to True): cache and add ``R``. False: rescale by the ratio only, with no
            per-token memory (saves one attention output per layer and branch).
        residual_dtype (`torch.dtype`, defaults to ``torch.bfloat16``): storage dtype of ``R``: float16, bfloat16,
            float32, float64 or an fp8 type (``torch.float8_e4m3fn`` / ``float8_e5m2``; upcast at each use).
        drift_threshold (`float`, *optional*): also rebuild when the pooled queries drift,
            ``mean_{h, video blocks} (1 - cos(q̄_t, q̄_ref)) > drift_threshold`` for any sample (q̄ = true-count
            block means, q̄_ref = at the last build). In [0, 2]. None (default) disables the check (and its read of
            q per step). The decision is made on the host, so with a threshold every reuse step forces one
            device-to-host sync (the only sync on the sparse path; none without it).
        warn_bytes (`int`, *optional*, defaults to 4 GiB): warn once, with the byte count, when a
            :class:`ReuseCache` holds more than this many bytes of cached state. None disables the warning.
            Wan-14B 720p caches ~0.77 GB of residual per layer and branch in bf16 (docs/temporal_reuse.md#memory).
    """

    refresh_period: int = 5
    retention: bool = True
    ratio_slope: float = 0.04
    clamp_ratio: bool = False
    store_residual: bool = True
    residual_dtype: torch.dtype = torch.bfloat16
    drift_threshold: float | None = None
    warn_bytes: int | None = field(default=4 * 2**30)

    def __post_init__(self) -> None:
        if not _is_int(self.refresh_period) or self.refresh_period < 1:
            raise ValueError(f"TemporalReuseConfig.refresh_period must be an int >= 1 (1 = rebuild every step), "
                             f"got {self.refresh_period!r}.")
        for name in ("retention", "clamp_ratio", "store_residual"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"TemporalReuseConfig.{name} must be a bool, got {v!r}.")
        if not _is_real(self.ratio_slope) or self.ratio_slope < 0:
            raise ValueError(f"TemporalReuseConfig.ratio_slope must be a finite number >= 0 (paper: 0.04), got "
                             f"{self.ratio_slope!r}.")
        if self.residual_dtype not in _RESIDUAL_DTYPES:
            raise ValueError(f"TemporalReuseConfig.residual_dtype must be one of {list(_RESIDUAL_DTYPES)}, got "
                             f"{self.residual_dtype!r}.")
        if self.drift_threshold is not None and (not _is_real(self.drift_threshold)
                                                 or not 0 <= self.drift_threshold <= 2):
            raise ValueError(f"TemporalReuseConfig.drift_threshold must be None or a number in [0, 2] "
                             f"(1 - cosine), got {self.drift_threshold!r}.")
        if self.warn_bytes is not None and (not _is_int(self.warn_bytes) or self.warn_bytes < 0):
            raise ValueError(f"TemporalReuseConfig.warn_bytes must be None or an int >= 0 (bytes), got "
                             f"{self.warn_bytes!r}.")


def _tensor_bytes(tensors) -> int:
    """Bytes of the storages behind ``tensors`` (each storage counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


@dataclass(eq=False)
class TemporalReuseState:
    """Cached plan and Re-ttention terms of one (layer, branch). Create through :meth:`ReuseCache.get`.

    Attributes:
        plan (`SparsePlan` or None): the reused plan (no epilogue); its block mask is ``plan.to_dense()``.
        built_step (`int` or None): step at which ``plan`` was built.
        q_ref (`torch.Tensor` or None): float32 ``[B, H, Nv, D]`` pooled video queries at ``built_step``
            (only with ``drift_threshold``).
        rho (`torch.Tensor` or None): float32 ``[B, H, P]`` cached ratio ``exp(LSE_sparse - LSE_full)``.
        residual (`torch.Tensor` or None): ``[B, P, H, D]`` in ``residual_dtype``, ``O_full - rho * O_sparse``.
        cache_step (`int` or None): step at which ``rho`` and ``residual`` were measured.
        num_builds (`int`): plan builds since the last :meth:`reset`.
    """

    plan: SparsePlan | None = None
    built_step: int | None = None
    q_ref: torch.Tensor | None = None
    rho: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    cache_step: int | None = None
    num_builds: int = 0
    signature: tuple | None = field(default=None, repr=False)
    _owner: ReuseCache | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Drop every cached tensor (call at the start of each generation)."""
        self.plan = self.q_ref = self.rho = self.residual = None
        self.built_step = self.cache_step = self.signature = None
        self.num_builds = 0

    @property
    def mask(self) -> torch.Tensor | None:
        """The cached bool block mask ``[B | 1, H | 1, N, N]`` (rebuilt from the plan; debugging)."""
        return None if self.plan is None else self.plan.to_dense()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors: plan CSR tables, ``q_ref``, ``rho`` and ``residual``.

        The plan's ``kv_block_valid`` belongs to the (shared, cached) layout and is not counted.
        """
        plan = self.plan
        tensors = [self.q_ref, self.rho, self.residual]
        if plan is not None:
            tensors += [plan.kv_num_blocks, plan.kv_indices]
        return _tensor_bytes(tensors)

    def _updated(self, config: TemporalReuseConfig) -> None:
        if torch.compiler.is_compiling():  # storage accounting is host bookkeeping: eager calls only
            return
        if self._owner is not None:
            self._owner._check_memory(config)
        elif config.warn_bytes is not None and self.nbytes > config.warn_bytes:
            _warn_memory(self.nbytes, 1, config.warn_bytes, key=f"temporal_reuse.state.{id(self)}")


def _warn_memory(nbytes: int, states: int, limit: int, key: str) -> None:
    warn_once(f"Temporal reuse caches {nbytes} bytes ({nbytes / 2**30:.2f} GiB) of plans, ratios and residuals "
              f"across {states} (layer, branch) state(s), above warn_bytes={limit}. To reduce it, apply reuse to "
              "fewer layers, store the residual in fp8 (residual_dtype=torch.float8_e4m3fn), or drop it "
              "(store_residual=False); raise warn_bytes to silence this.", UserWarning, key=key)


_cache_ids = itertools.count()


class ReuseCache:
    """Per-(layer, branch) :class:`TemporalReuseState` store, with memory accounting.

    Args:
        config (`TemporalReuseConfig`, *optional*): supplies ``warn_bytes`` when a call does not pass its own.

    ``cache.get(layer_key, branch)`` returns (creating on first use) the state of one layer and CFG branch
    (``"cond"``, ``"uncond"``, ``"cond_uncond"`` or any hashable); ``cache[(layer_key, branch)]``, ``in``,
    ``len`` and iteration read the existing states only. ``reset()`` clears every state: call it at the
    start of each generation. ``nbytes()`` totals the cached bytes; when a state update pushes the total above
    ``warn_bytes``, one warning with the byte count is emitted for this cache.
    """

    def __init__(self, config: TemporalReuseConfig | None = None) -> None:
        if config is not None and not isinstance(config, TemporalReuseConfig):
            raise ValueError(f"ReuseCache expects a TemporalReuseConfig or None, got {type(config).__name__}.")
        self.config = config
        self._states: dict[tuple[Hashable, Hashable], TemporalReuseState] = {}
        self._key = f"temporal_reuse.cache.{next(_cache_ids)}"

    def get(self, layer_key: Hashable, branch: Hashable = None) -> TemporalReuseState:
        """The state of ``(layer_key, branch)``, created empty on first use."""
        try:
            key = (layer_key, branch)
            hash(key)
        except TypeError:
            raise ValueError(f"ReuseCache keys must be hashable, got layer_key={layer_key!r}, "
                             f"branch={branch!r}.") from None
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = TemporalReuseState(_owner=self)
        return state

    def __getitem__(self, key: tuple[Hashable, Hashable]) -> TemporalReuseState:
        return self._states[key]

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __iter__(self) -> Iterator[tuple[Hashable, Hashable]]:
        return iter(self._states)

    def items(self):
        """``((layer_key, branch), state)`` pairs."""
        return self._states.items()

    def __len__(self) -> int:
        return len(self._states)

    def reset(self) -> None:
        """Clear every state (they stay registered, so references held by callers remain valid)."""
        for state in self._states.values():
            state.reset()

    def nbytes(self) -> int:
        """Total bytes of cached tensors over all states."""
        return sum(s.nbytes for s in self._states.values())

    def _check_memory(self, config: TemporalReuseConfig) -> None:
        limit = config.warn_bytes if self.config is None else self.config.warn_bytes
        if limit is None:
            return
        total = self.nbytes()
        if total > limit:
            _warn_memory(total, len(self._states), limit, key=self._key)

    def __repr__(self) -> str:
        return f"ReuseCache(states={len(self._states)}, nbytes={self.nbytes()})"


# ---------------------------------------------------------------------------------------------------- numerics
def retention_terms(out_full: torch.Tensor, lse_full: torch.Tensor, out_sparse: torch.Tensor,
                    lse_sparse: torch.Tensor, *, residual_dtype: torch.dtype | None = torch.bfloat16):
    """Re-ttention's cached ratio and residual from one dense and one sparse call on the same q, k, v.

    Args:
        out_full, out_sparse (`torch.Tensor`): ``[B, P, H, D]`` attention outputs.
        lse_full, lse_sparse (`torch.Tensor`): ``[B, H, P]`` natural-log log-sum-exps.
        residual_dtype (`torch.dtype`, *optional*): dtype of the returned residual; None skips it.

    Returns:
        ``rho`` float32 ``[B, H, P]`` = ``exp(lse_sparse - lse_full)``, and ``residual`` ``[B, P, H, D]`` =
        ``out_full - rho * out_sparse`` (computed in float32, float64 for float64 outputs, with the float32
        ``rho`` actually stored, so ``rho * out_sparse + residual`` reproduces ``out_full``). Rows with
        ``lse_full = -inf`` (read no key) get ``rho = 1``; rows with ``lse_sparse = -inf`` get ``rho = 0``.
    """
    finite = torch.isfinite(lse_full)
    rho = torch.exp(lse_sparse.float() - lse_full.float())
    rho = torch.where(finite, rho, torch.ones_like(rho))
    if residual_dtype is None:
        return rho, None
    cdtype = torch.float64 if out_full.dtype == torch.float64 else torch.float32
    res = out_full.to(cdtype) - rho.transpose(1, 2).unsqueeze(-1).to(cdtype) * out_sparse.to(cdtype)
    return rho, res.to(residual_dtype)


def pooled_query_drift(q_pooled: torch.Tensor, q_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample drift ``mean_{h, n} (1 - cos(q_pooled[b, h, n], q_ref[b, h, n]))`` -> float32 ``[B]``.

    ``q_pooled`` / ``q_ref``: ``[B, H, Nv, D]`` pooled queries (``ref`` may have batch 1).
    """
    cos = F.cosine_similarity(q_pooled.float(), q_ref.float(), dim=-1, eps=1e-12)
    return (1.0 - cos).flatten(1).mean(1)


def _pooled_video_q(q: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    return pool_blocks(q, layout)[:, :, : layout.num_video_blocks].contiguous()


def _narrowed(plan: SparsePlan, width: int) -> SparsePlan:
    """``plan`` with only the first ``width`` columns of ``kv_indices`` (a copy: the full-width table is freed).
    ``from_dense`` lists each row's blocks first, so nothing is lost while every row reads at most ``width``."""
    if not _is_int(width) or width < 1:
        raise ValueError(f"plan_width must be an int >= 1 (key blocks per row), got {width!r}.")
    if checks_enabled() and bool((plan.kv_num_blocks > width).any()):
        raise ValueError(f"plan_width={width} is below the {int(plan.kv_num_blocks.max())} key blocks a row of "
                         "this mask reads: the bound is wrong for this method (report it); pass plan_width=None.")
    return dataclasses.replace(plan, kv_indices=plan.kv_indices[..., :width].contiguous())


# ---------------------------------------------------------------------------------------------------- the call
def reuse_attention(q_perm: torch.Tensor, k_perm: torch.Tensor, v_perm: torch.Tensor, layout: TokenLayout, *,
                    step: int, state: TemporalReuseState, config: TemporalReuseConfig,
                    build_mask: Callable[[], torch.Tensor], scale: float | None = None, backend: str | None = None,
                    epilogue: Callable[[SparsePlan], SparsePlan] | None = None,
                    segment: Callable[[SparsePlan], PooledSegment] | None = None,
                    plan_width: int | None = None) -> torch.Tensor:
    r"""Block-sparse attention with a plan reused across denoising steps, optionally corrected by Re-ttention.

    Rebuild (call ``build_mask()``, store the plan, ``built_step = step``) when the state has no plan, when
    ``step - built_step >= refresh_period``, when ``step < built_step`` (a new generation without
    :meth:`~ReuseCache.reset`), when the pooled-query drift exceeds ``drift_threshold``, or when the layout, the
    shapes, the device or the scale changed.

    * ``retention=True``: a rebuild step is a cache step. It runs dense and sparse attention with LSE, caches
      ``rho = exp(LSE_sparse - LSE_full)`` and ``R = O_full - rho * O_sparse`` and returns ``O_full`` (exact).
      Other steps return ``(rho + λ·Δt) * O_sparse + R`` (``Δt = step - cache_step``; ratio clamped to <= 1 with
      ``clamp_ratio``; no ``R`` with ``store_residual=False``), fused in the attention epilogue.
    * ``retention=False``: sparse attention with the cached plan, with the caller's ``epilogue`` if given.

    Args:
        q_perm, k_perm, v_perm (`torch.Tensor`): permuted ``[B, P, H, D]`` (``layout.permute``), P =
            ``layout.padded_len``.
        layout (`TokenLayout`): the layout the tensors were permuted with.
        step (`int`): denoising step index (>= 0), counted per generation (docs/composition.md#steps-and-branches).
        state (`TemporalReuseState`): this (layer, branch)'s state, from :meth:`ReuseCache.get`.
        config (`TemporalReuseConfig`): reuse / Re-ttention settings.
        build_mask (`Callable[[], torch.Tensor]`): returns the method's bool block mask ``[B | 1, H | 1, N, N]``;
            called only at rebuild steps.
        scale (`float`, *optional*): softmax scale, ``1 / sqrt(D)`` by default.
        epilogue (`Callable[[SparsePlan], SparsePlan]`, *optional*): attaches the caller's own epilogue (e.g.
            pooled rectification's R and c, recomputed each step) to the reused plan. Not combined with
            ``retention`` (``NotImplementedError``).
        segment (`Callable[[SparsePlan], PooledSegment]`, *optional*): the pooled key segment of the per-row
            rectification (``combine="row"``, docs/rectification.md#row-combine) for the reused plan, rebuilt every
            step from this step's pooled keys and values, so a reused plan keeps a correct remainder. Not combined with
            ``retention`` (``NotImplementedError``).
        plan_width (`int`, *optional*): a bound, known from the method's config and the layout alone, on the key
            blocks any row of ``build_mask()``'s masks reads (:func:`dit_sparse.methods.engine.plan_row_bound`):
            the cached plan keeps only that many columns of ``kv_indices`` (``[B, H, N, plan_width]`` instead of
            ``[B, H, N, N]`` int32). A bound that a mask exceeds would drop blocks: ``DIT_SPARSE_CHECKS=1`` checks it.

    Other Parameters:
        backend (`str`, *optional*): attention backend, see :func:`dit_sparse.block_sparse_attention`.

    Returns:
        `torch.Tensor`: ``[B, P, H, D]`` in the dtype of ``q_perm``; unpermute with ``layout.unpermute``.
    """
    if not isinstance(config, TemporalReuseConfig):
        raise ValueError(f"config must be a TemporalReuseConfig, got {type(config).__name__}.")
    if not isinstance(state, TemporalReuseState):
        raise ValueError(f"state must be a TemporalReuseState (from ReuseCache.get(layer, branch)), got "
                         f"{type(state).__name__}.")
    if not isinstance(layout, TokenLayout):
        raise ValueError(f"layout must be a TokenLayout, got {type(layout).__name__}.")
    if not _is_int(step) or step < 0:
        raise ValueError(f"step must be a denoising step index (int >= 0), got {step!r}.")
    if not callable(build_mask):
        raise ValueError(f"build_mask must be a callable returning a bool block mask, got "
                         f"{type(build_mask).__name__}.")
    if config.retention and segment is not None:
        raise NotImplementedError(
            "reuse_attention got retention=True and a pooled segment: per-row rectification and Re-ttention both "
            "correct the softmax denominator of the dropped blocks and are not combined "
            "(docs/composition.md#rectification-and-re-ttention-do-not-combine). Use "
            "TemporalReuseConfig(retention=False) to reuse the plan with the pooled segment.")
    if config.retention and epilogue is not None:
        raise NotImplementedError(
            "reuse_attention got retention=True and a caller epilogue: pooled rectification and Re-ttention both "
            "correct the softmax denominator of the dropped blocks and are not combined "
            "(docs/composition.md#rectification-and-re-ttention-do-not-combine). Use "
            "TemporalReuseConfig(retention=False) to reuse the plan with your epilogue, or drop the epilogue.")
    for name, t in (("q_perm", q_perm), ("k_perm", k_perm), ("v_perm", v_perm)):
        check_permuted(t, layout, name)
    scale = 1.0 / math.sqrt(q_perm.shape[-1]) if scale is None else float(scale)
    signature = (layout, tuple(q_perm.shape), tuple(k_perm.shape), tuple(v_perm.shape), q_perm.device, scale)

    # -- decide whether to rebuild the plan
    refresh = (state.plan is None or state.signature != signature or step < state.built_step
               or step - state.built_step >= config.refresh_period)
    if config.retention and not refresh:  # cached terms missing (e.g. the state was filled without retention)
        refresh = state.rho is None or (config.store_residual and state.residual is None)
    q_pooled = None
    if config.drift_threshold is not None:
        q_pooled = _pooled_video_q(q_perm, layout)
        if not refresh:
            refresh = state.q_ref is None or bool(
                (pooled_query_drift(q_pooled, state.q_ref) > config.drift_threshold).any())

    if refresh:
        mask = build_mask()
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            got = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"build_mask() must return a bool block mask [B|1, H|1, N, N], got {got}.")
        plan = plan_from_mask(mask.to(q_perm.device), layout)
        if plan_width is not None and plan_width < plan.kv_indices.shape[-1]:
            plan = _narrowed(plan, plan_width)
        state.rho = state.residual = state.cache_step = None
        state.plan, state.built_step, state.signature = plan, step, signature
        state.q_ref = q_pooled
        state.num_builds += 1

    plan = state.plan
    if not config.retention:
        if epilogue is not None:
            plan = epilogue(plan)
            if not isinstance(plan, SparsePlan):
                raise ValueError(f"epilogue must return a SparsePlan (plan.with_epilogue(...)), got "
                                 f"{type(plan).__name__}.")
        pooled = None if segment is None else segment(plan)  # fresh pooled keys every step, on the reused plan
        out = block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, backend=backend, pooled=pooled)
        if refresh:
            state._updated(config)
        return out

    if refresh:
        # -- cache step: exact dense output, cache rho and R for the following sparse steps
        bs = layout.block_size
        out_full, lse_full = dense_attention_lse(q_perm, k_perm, v_perm, scale=scale, block_q=bs, block_k=bs,
                                                 kv_block_valid=layout.block_valid(q_perm.device), backend=backend)
        out_sparse, lse_sparse = block_sparse_attention(q_perm, k_perm, v_perm, plan, scale=scale, return_lse=True,
                                                        backend=backend)
        rho, residual = retention_terms(out_full, lse_full, out_sparse, lse_sparse,
                                        residual_dtype=config.residual_dtype if config.store_residual else None)
        state.rho, state.residual, state.cache_step = rho, residual, step
        state._updated(config)
        return out_full

    # -- sparse step: (rho + λΔt) * O_sparse + R in the epilogue
    ratio = state.rho + config.ratio_slope * (step - state.cache_step)
    if config.clamp_ratio:
        ratio = ratio.clamp(max=1.0)
    bias = state.residual
    if bias is not None and bias.dtype not in _BIAS_DTYPES:
        bias = bias.to(q_perm.dtype)
    out = block_sparse_attention(q_perm, k_perm, v_perm, plan.with_epilogue(ratio, bias), scale=scale,
                                 backend=backend)
    return out
