"""``apply`` / ``remove`` / ``is_applied``: install dit_sparse processors and the context hook on diffusers models.

    pipe = WanPipeline.from_pretrained(...)
    dit_sparse.apply(pipe, "wan2.1-t2v-1.3b:draft-80")        # or a SparseAttentionConfig
    video = pipe(prompt, ...).frames[0]
    dit_sparse.remove(pipe)                                    # original processors back, exactly

Processors are installed with a full ``set_attn_processor`` dict: targeted stock processors are replaced, all
others (e.g. HunyuanVideo's token refiner) are kept as they are. Pipelines with two transformers (Wan2.2:
``transformer`` and ``transformer_2``) get processors and hooks on both.
"""

from __future__ import annotations

import torch

from ..methods.engine import SparseAttentionConfig
from .adapters.base import SparseRuntime, get_adapter
from .context import ContextHook, install_context_hook, remove_context_hook
from .parallel import carry_parallel_config

__all__ = ["apply", "remove", "is_applied", "get_runtime", "sparse_processors", "transformers_of", "attn_processors",
           "set_attn_processors"]

_ATTR = "_dit_sparse_runtime"
_ORIGINAL = "_dit_sparse_original_processors"
TRANSFORMER_ATTRS = ("transformer", "transformer_2")


def transformers_of(obj) -> list[tuple[str, torch.nn.Module]]:
    """``[(name, transformer)]`` of a pipeline (``transformer``, ``transformer_2``) or ``[("", obj)]`` for a model."""
    if isinstance(obj, torch.nn.Module):
        return [("", obj)]
    found = [(a, getattr(obj, a)) for a in TRANSFORMER_ATTRS if getattr(obj, a, None) is not None]
    if not found:
        raise ValueError(f"dit_sparse.apply expects a diffusers pipeline with a .transformer or a transformer "
                         f"model, got {type(obj).__name__}.")
    return found


def _attention_modules(transformer: torch.nn.Module) -> dict:
    """``{"<path>.processor": module}`` for modules holding a processor: ``get_processor`` (diffusers' attention
    classes) or a plain ``processor`` attribute (``MochiAttention``)."""
    return {f"{name}.processor": m for name, m in transformer.named_modules()
            if name and (hasattr(m, "get_processor") or "processor" in vars(m))}


def attn_processors(transformer: torch.nn.Module) -> dict:
    """``{"<module path>.processor": processor}`` of every attention module, like diffusers'
    ``AttentionMixin.attn_processors``; also for transformers without that mixin (Cosmos, Mochi)."""
    if hasattr(type(transformer), "attn_processors"):
        return transformer.attn_processors
    return {name: m.get_processor() if hasattr(m, "get_processor") else m.processor
            for name, m in _attention_modules(transformer).items()}


def set_attn_processors(transformer: torch.nn.Module, processors: dict) -> None:
    """Install a FULL ``{name: processor}`` dict (every attention module), like ``set_attn_processor(dict)``."""
    if hasattr(transformer, "set_attn_processor"):
        transformer.set_attn_processor(processors)
        return
    modules = _attention_modules(transformer)
    if set(modules) != set(processors):
        raise ValueError(f"A full processor dict for {type(transformer).__name__} names exactly its "
                         f"{len(modules)} attention modules; got {len(processors)} entries "
                         f"(missing {sorted(set(modules) - set(processors))[:3]}, "
                         f"unknown {sorted(set(processors) - set(modules))[:3]}).")
    for name, module in modules.items():
        if hasattr(module, "set_processor"):
            module.set_processor(processors[name])
        else:
            module.processor = processors[name]


def _resolve_config(config_or_preset, transformer) -> SparseAttentionConfig:
    if isinstance(config_or_preset, SparseAttentionConfig):
        return config_or_preset
    if isinstance(config_or_preset, str):
        from .pipelines.presets import get_preset

        preset = get_preset(config_or_preset)
        if preset.transformer_class != type(transformer).__name__:
            raise ValueError(f"Preset {preset.name!r} is for {preset.transformer_class} ({preset.family}), but this "
                             f"transformer is a {type(transformer).__name__}; pick a preset of its family from "
                             "dit_sparse.list_presets().")
        return preset.config
    raise ValueError(f"dit_sparse.apply expects a SparseAttentionConfig or a preset name (see "
                     f"dit_sparse.list_presets()), got {type(config_or_preset).__name__}.")


def sparse_processors(transformer: torch.nn.Module, config_or_preset, *, scheduler=None) -> dict:
    """dit_sparse processors for ``transformer``, for ``transformer.set_attn_processor(...)`` (or
    :func:`set_attn_processors` for transformers without it, e.g. Cosmos, Mochi).

    Installs the context hook (grid, step, CFG branch) the processors read, and returns a FULL processor dict:
    video self-attention processors replaced, every other processor kept as it is. ``dit_sparse.remove``
    undoes both.

        procs = dit_sparse.sparse_processors(pipe.transformer, "wan2.1-t2v-1.3b:draft-80")
        pipe.transformer.set_attn_processor(procs)

    The transformer counts as applied (:func:`is_applied`) only once these processors are installed. Processors
    that are never installed leave a pending runtime and hook, which the next ``sparse_processors``, ``apply``
    or ``remove`` clears.
    """
    if is_applied(transformer):
        raise ValueError(f"dit_sparse is already applied to this {type(transformer).__name__} with "
                         f"{getattr(transformer, _ATTR).config!r}; call dit_sparse.remove(...) first.")
    adapter = get_adapter(transformer)
    config = _resolve_config(config_or_preset, transformer)
    _clear_pending(transformer)
    runtime = SparseRuntime(config, adapter)
    original = dict(attn_processors(transformer))
    # layer index = position in module registration order, which is forward order in diffusers transformers
    # (double-stream blocks before single-stream blocks, block 10 after block 9)
    candidates = [n for n, p in original.items()
                  if type(p).__name__ in adapter.processor_classes and adapter.is_sparse_candidate(n)]
    if not candidates:
        found = sorted({type(p).__name__ for p in original.values()})
        raise ValueError(f"No {', '.join(adapter.processor_classes)} processors found in "
                         f"{type(transformer).__name__} (found {found}); was another attention patch applied first? "
                         "Restore the stock processors before applying dit_sparse.")
    order = {n: i for i, n in enumerate(candidates)}
    new = {n: adapter.processor(runtime, order[n], n, p) if n in order else p for n, p in original.items()}
    hook = ContextHook(runtime.context, adapter.grid_fn, scheduler=scheduler, on_new_generation=runtime.reset)
    install_context_hook(transformer, hook)
    setattr(transformer, _ATTR, runtime)
    setattr(transformer, _ORIGINAL, original)
    return new


def apply(pipe_or_transformer, config_or_preset, *, scheduler=None) -> list[SparseRuntime]:
    """Install sparse attention on a pipeline (all its transformers) or on one transformer.

    Args:
        pipe_or_transformer: a diffusers pipeline or transformer model of a supported family
            (see :func:`dit_sparse.integration.adapters.registry.supported_transformers`).
        config_or_preset (`SparseAttentionConfig` or `str`): the configuration, or a preset name.
        scheduler (*optional*): scheduler whose ``timesteps`` give the step count (taken from the pipeline when
            one is given).

    Context parallelism (diffusers Ulysses, :mod:`dit_sparse.integration.parallel`): call
    ``transformer.enable_parallelism(
    config=ContextParallelConfig(ulysses_degree=N))`` first, then ``apply`` (recommended); ``apply`` first also
    works for Wan and LTX. Ring attention (``ring_degree > 1``) raises ``NotImplementedError``.

    Returns:
        The :class:`~dit_sparse.integration.adapters.base.SparseRuntime` of each transformer (statistics, reset).

    Raises:
        ValueError: already applied (names the active config), unsupported model class (lists the supported
            ones), or a bad config.
    """
    targets = transformers_of(pipe_or_transformer)
    scheduler = scheduler if scheduler is not None else getattr(pipe_or_transformer, "scheduler", None)
    for _, tr in targets:  # check everything before changing anything
        if is_applied(tr):
            raise ValueError(f"dit_sparse is already applied to this {type(tr).__name__} with "
                             f"{getattr(tr, _ATTR).config!r}; call dit_sparse.remove(...) first.")
        get_adapter(tr)
    runtimes = []
    for _, tr in targets:
        set_attn_processors(tr, sparse_processors(tr, config_or_preset, scheduler=scheduler))
        runtimes.append(getattr(tr, _ATTR))
    return runtimes


def remove(pipe_or_transformer) -> None:
    """Restore the original processors (the very same objects) and remove the hook. No-op if not applied (a
    pending :func:`sparse_processors` call whose processors were never installed is cleared)."""
    for _, tr in transformers_of(pipe_or_transformer):
        if not _installed(tr):
            _clear_pending(tr)
            continue
        carry_parallel_config(attn_processors(tr), getattr(tr, _ORIGINAL))  # enable_parallelism after apply
        set_attn_processors(tr, getattr(tr, _ORIGINAL))
        remove_context_hook(tr)
        delattr(tr, _ATTR)
        delattr(tr, _ORIGINAL)


def _installed(tr: torch.nn.Module) -> bool:
    """True when ``tr`` runs processors of its own dit_sparse runtime (not merely prepared by
    :func:`sparse_processors`)."""
    runtime = getattr(tr, _ATTR, None)
    if runtime is None:
        return False
    return any(getattr(p, "runtime", None) is runtime for p in attn_processors(tr).values())


def _clear_pending(tr: torch.nn.Module) -> None:
    """Drop the runtime and hook of a :func:`sparse_processors` call whose processors were never installed."""
    if hasattr(tr, _ATTR) and not _installed(tr):
        remove_context_hook(tr)
        delattr(tr, _ATTR)
        delattr(tr, _ORIGINAL)


def is_applied(pipe_or_transformer) -> bool:
    """True when dit_sparse processors are installed on the transformer (or any transformer of the pipeline)."""
    return any(_installed(tr) for _, tr in transformers_of(pipe_or_transformer))


def get_runtime(transformer: torch.nn.Module) -> SparseRuntime | None:
    return getattr(transformer, _ATTR, None)
