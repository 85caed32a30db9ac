"""Per-transformer run-time context: latent grid, denoising step and classifier-free-guidance branch.

Processors see only token sequences. A diffusers ``ModelHook`` on the transformer (registered in its
``HookRegistry``, like diffusers' own cache hooks) fills a :class:`StepContext` before every forward:

* **grid** ``(frames, height, width)`` in patch tokens, read from the forward's inputs by the adapter;
* **step**: counts *changes* of the timestep value (its max, for per-token timesteps), so cond and uncond calls
  of one step share it and no CFG pattern is assumed; reset at the start of every generation
  (:meth:`StepContext.reset`, done by :func:`dit_sparse.apply` hooks when the pipeline's step index restarts);
* **branch**: the name of the pipeline's ``transformer.cache_context(...)`` (``"cond"``, ``"uncond"``,
  ``"cond_uncond"``), or None outside a pipeline;
* **num_steps**: from the cache context when the pipeline passes it, else from the pipeline's scheduler.

The hook is stateful in diffusers' sense (it holds a ``StateManager``), so pipelines' ``cache_context`` reaches it.

**Host reads.** Reading a device value on the host (``.tolist()``, ``float(t)``, ``nonzero``) makes the host wait for
the device (a device-to-host sync on CUDA). The sparse layer calls never do it
(``tests/integration/adapters/test_contract.py::test_sparse_path_does_not_sync``); what must come to the host because
it decides shapes or the plan (the step, the grid from ``img_ids``, a valid-text count) goes through
:func:`host_read`, at most once per transformer forward:

* the step: from the pipeline's cache context (``step_index``) when it gives one (no read), else one read of the
  timestep per forward (the step counts timestep changes); the schedule's first timestep is read once per
  ``scheduler.timesteps`` tensor;
* values derived from forward inputs (grid ids, masks): :func:`host_memo`, once per input tensor object, so the
  same tensor passed at every step (a pipeline's ``img_ids`` or prompt mask) is read once per generation and a
  tensor the transformer rebuilds every forward (HunyuanVideo's key-padding mask) once per forward, by its first
  sparse layer, never again by the others.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

__all__ = ["StepContext", "ContextHook", "CONTEXT_HOOK", "install_context_hook", "remove_context_hook", "host_read",
           "host_memo"]

T = TypeVar("T")


def host_read(why: str, read: Callable[[], T]) -> T:
    """``read()``: code that brings device values to the host (a device-to-host sync on CUDA).

    Every such read on a transformer forward's path goes through here, saying ``why`` it cannot stay on the
    device; nothing else on that path reads device values. The no-sync tests allow exactly the reads made inside
    this function (``tests/sync_guard.py``, ``allow=``), and check each reason occurs at most once per forward.
    """
    return read()


#: forwards seen by any context hook: keys :func:`host_memo` entries of tensors without a version counter
_FORWARDS = itertools.count()
_forward_epoch = next(_FORWARDS)
_MEMO: dict = {}
_MEMO_SIZE = 64


def _next_forward() -> None:
    """A transformer forward starts: :func:`host_memo` entries of inference tensors expire."""
    global _forward_epoch
    _forward_epoch = next(_FORWARDS)


def host_memo(why: str, tensor: torch.Tensor, extra: Hashable, compute: Callable[[], T]) -> T:
    """``compute()`` (a :func:`host_read` of values derived from ``tensor``), memoized per tensor object.

    A hit needs the very same tensor object (weak reference, so a freed tensor's id is never confused with a new
    one), unmodified since (its version counter; inference tensors have none, so their entries hold for the current
    transformer forward only), and the same ``extra`` (shapes the result depends on). ``why`` names the read, as
    in :func:`host_read`.
    """
    try:
        version = tensor._version
    except RuntimeError:  # inference tensor: no version counter
        version = ("forward", _forward_epoch)
    key = (why, id(tensor), version, extra)
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is tensor:
        return hit[1]
    value = host_read(why, compute)
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = (weakref.ref(tensor), value)
    return value

#: name of our hook in the transformer's diffusers HookRegistry
CONTEXT_HOOK = "dit_sparse_context"

GridFn = Callable[[torch.nn.Module, tuple, dict], "tuple[int, int, int] | None"]


@dataclass
class StepContext:
    """What every processor of one transformer knows about the current forward call."""

    grid: tuple[int, int, int] | None = None
    step: int = -1
    num_steps: int | None = None
    branch: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    _last_t: float | None = None

    def reset(self) -> None:
        self.grid, self.step, self.num_steps, self.branch, self._last_t = None, -1, None, None, None
        self.extras.clear()

    def advance(self, timestep) -> None:
        """Count a new step when the timestep value changes (cond and uncond share it).

        ``timestep``: the forward's timestep, or its value already read (a float: one read per forward).
        """
        t = timestep if isinstance(timestep, float) else _max_value(timestep)
        if t is None:
            if self.step < 0:
                self.step = 0
            return
        if t != self._last_t:
            self.step, self._last_t = self.step + 1, t


def _max_value(timestep) -> float | None:
    """The timestep as one float (max over per-token timesteps), or None."""
    if torch.is_tensor(timestep):
        if not timestep.numel():
            return None
        return host_read("the step counts timestep changes (no step_index in the cache context)",
                         lambda: float(timestep.detach().float().max()))
    return None if timestep is None else float(timestep)


def _first_timestep(scheduler) -> float | None:
    ts = getattr(scheduler, "timesteps", None) if scheduler is not None else None
    if ts is None or len(ts) == 0:
        return None
    if torch.is_tensor(ts):
        return host_memo("a run restarting at the schedule's first timestep starts a new generation", ts, None,
                         lambda: float(ts[0]))
    return float(ts[0])


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class ContextHook(ModelHook):
    """Fills a :class:`StepContext` before every forward of the transformer it is registered on.

    Args:
        context: the context shared with this transformer's processors.
        grid_fn: ``(module, args, kwargs) -> (frames, height, width)`` in patch tokens, or None when unknown.
        scheduler: optional scheduler whose ``timesteps`` give the number of steps.
        on_new_generation: called when a new generation starts (state resets).
    """

    _is_stateful = True

    def __init__(self, context: StepContext, grid_fn: GridFn, scheduler=None,
                 on_new_generation: Callable[[], None] | None = None):
        super().__init__()
        self.context = context
        self.grid_fn = grid_fn
        self.scheduler = scheduler
        self.on_new_generation = on_new_generation
        # diffusers hands the pipeline's cache_context to every StateManager attribute of stateful hooks
        self.state_manager = StateManager(_NoState)

    def _new_generation(self) -> None:
        if self.on_new_generation is not None:  # before the context is cleared: it may record what ran
            self.on_new_generation()
        self.context.reset()

    def pre_forward(self, module, *args, **kwargs):
        _next_forward()
        ctx = self.context
        cache_ctx = self.state_manager._context
        step_index = getattr(cache_ctx, "step_index", None)
        if step_index is not None:
            # the pipeline says the step: no read of the timestep (a host sync); a new generation restarts it
            if ctx.step >= 0 and step_index < ctx.step:
                self._new_generation()
            ctx.step = int(step_index)
        else:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            # a new generation: the timestep goes back up
            t = _max_value(timestep)  # the one read of the timestep of this forward
            rose = t is not None and ctx._last_t is not None and t > ctx._last_t
            # a run that starts at the schedule's first timestep again (models without diffusers' cache reset)
            again = False
            if t is not None and ctx.step > 0 and t != ctx._last_t:
                first = _first_timestep(self.scheduler)
                again = first is not None and t == first
            if rose or again:
                self._new_generation()
            ctx.advance(t)
        ctx.branch = getattr(cache_ctx, "name", None)
        n = getattr(cache_ctx, "num_inference_steps", None)
        if n is None and self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            n = len(self.scheduler.timesteps)
        ctx.num_steps = n
        ctx.grid = self.grid_fn(module, args, kwargs)
        return args, kwargs

    def reset_state(self, module):
        self._new_generation()
        return module


def install_context_hook(transformer: torch.nn.Module, hook: ContextHook) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(CONTEXT_HOOK) is not None:
        raise ValueError("dit_sparse's context hook is already installed on this transformer; call "
                         "dit_sparse.remove(...) first.")
    registry.register_hook(hook, CONTEXT_HOOK)


def remove_context_hook(transformer: torch.nn.Module) -> None:
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(CONTEXT_HOOK) is not None:
        registry.remove_hook(CONTEXT_HOOK, recurse=False)
