"""What every model adapter shares: its spec and lookup, the run-time object per transformer, the processor base.

An adapter only declares what differs between models (docs/models.md#text-placement,
docs/models.md#adapters-and-diffusers-processors): which stock processors to replace, where the text sits, how to read
the latent grid from the forward's inputs. Its processor copies the stock processor's projections, norms and RoPE and
swaps only the attention call for :meth:`SparseProcessorBase.attend`, which runs the stock attention (``dense``)
whenever the call stays dense.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..._env import checks_enabled
from ..._logging import warn_once
from ...layout import TokenLayout
from ...methods.engine import SparseAttention, SparseAttentionConfig
from ..context import StepContext
from ..parallel import check_same_on_all_ranks, ulysses_attention, ulysses_group
from .registry import ADDING_A_MODEL, Family, family_of, load_spec, supported_transformers

__all__ = ["AdapterSpec", "SparseRuntime", "SparseProcessorBase", "get_adapter", "supported_transformers"]


@dataclass(frozen=True)
class AdapterSpec:
    """Per-model metadata.

    Args:
        family: the model family served (:data:`~dit_sparse.integration.adapters.registry.FAMILIES`): its name and
            transformer class.
        processor_classes: stock processor class names to replace (others stay untouched, e.g. HunyuanVideo's
            token refiner keeps ``AttnProcessor2_0``).
        processor: called as ``processor(runtime, layer, name, stock)`` for each video self-attention module: the
            sparse processor class, or a function choosing one from the stock processor.
        grid_fn: ``(transformer, args, kwargs) -> (frames, height, width)`` in patch tokens, or None.
        text_position: where text sits in the self-attention call (``"before"``, ``"after"``) or None (text
            only in cross-attention).
        is_sparse_candidate: ``(processor name) -> bool``: modules that may run sparse (video self-attention).
            Only these get a dit_sparse processor; cross-attention keeps its stock processor.
        context_parallel: None when sparse calls work under diffusers' Ulysses context parallelism; otherwise why
            not, and sparse configs then raise ``NotImplementedError`` with that reason (a dense config still runs).
    """

    family: Family
    processor_classes: tuple[str, ...]
    processor: Callable
    grid_fn: Callable
    text_position: str | None
    is_sparse_candidate: Callable[[str], bool] = lambda name: True
    context_parallel: str | None = None

    @property
    def name(self) -> str:
        """The family's name (``"wan"``)."""
        return self.family.name

    def check_context_parallel(self) -> None:
        """Raise ``NotImplementedError`` when this model's sparse calls cannot run under context parallelism."""
        if self.context_parallel is not None:
            raise NotImplementedError(
                f"dit_sparse: sparse attention on {self.family.transformer} under context parallelism "
                f"(enable_parallelism) is not supported: {self.context_parallel}. Use a dense config "
                "(DensePolicy(force_dense=True)) under context parallelism, or run this model without it.")


def get_adapter(transformer: torch.nn.Module) -> AdapterSpec:
    """The adapter for this transformer's class; ``ValueError`` listing the supported classes otherwise."""
    name = type(transformer).__name__
    family = family_of(name)
    if family is None:
        raise ValueError(f"dit_sparse has no adapter for {name}. Supported transformers: "
                         f"{', '.join(supported_transformers())}. To add {name}, follow the recipe in "
                         f"{ADDING_A_MODEL}: one adapter file declaring the processors to replace, the text "
                         "position and the grid, plus one test-table entry.")
    return load_spec(family)


class SparseRuntime:
    """Everything the processors of ONE transformer share: config, engine, step context, adapter."""

    def __init__(self, config: SparseAttentionConfig, adapter: AdapterSpec):
        self.config = config
        self.adapter = adapter
        self.engine = SparseAttention(config)
        self.context = StepContext()
        self.calls = {"sparse": 0, "dense": 0}
        #: summary of the last finished generation (see :meth:`summary`), kept across :meth:`reset`
        self.last_run: dict | None = None
        #: set True to keep each layer's last block mask of a generation in :attr:`last_masks` (CPU copies;
        #: large at real resolutions, so off by default): the demo draws them
        self.record_masks = False
        self.last_masks: dict = {}
        #: set True to also run the stock attention on every sparse call and record the relative L2 error of
        #: the sparse output per layer (fidelity measurements; doubles the attention cost, and reads each error on
        #: the host: one device-to-host sync per sparse call, unlike the sparse path itself)
        self.track_error = False
        self.layer_errors: dict[int, list[float]] = {}

    def summary(self) -> dict:
        """Attention calls (sparse / dense), steps seen, mean density (overall and per layer) of one generation.

        Which one is in ``out["run"]``: ``"current"`` while a generation is running (calls since the last
        reset), ``"last"`` between generations (a pipeline call has ended and reset the runtime: the last
        finished generation, :attr:`last_run`), ``"none"`` before any call (all zeros).
        """
        if self.calls["sparse"] or self.calls["dense"]:
            return {**self._current(), "run": "current"}
        if self.last_run is not None:
            return {**self.last_run, "run": "last"}
        return {**self._current(), "run": "none"}

    def _current(self) -> dict:
        out = {"calls": dict(self.calls), "steps": self.context.step + 1, "density": self.density,
               "layer_density": self.engine.stats}
        if self.layer_errors:
            out["layer_rel_error"] = {k: sum(v) / len(v) for k, v in sorted(self.layer_errors.items())}
        return out

    def reset(self) -> None:
        """Start a new generation: record :attr:`last_run`, clear reuse state and statistics.

        Called by the context hook when a generation ends (diffusers resets stateful hooks at the end of every
        pipeline call) or a new one starts; the hook clears the step context itself.
        """
        if self.calls["sparse"] or self.calls["dense"]:
            self.last_run = self._current()
            if self.record_masks:
                self.last_masks = self.engine.masks()
        self.engine.reset()
        self.calls = {"sparse": 0, "dense": 0}
        self.layer_errors = {}

    @functools.lru_cache(maxsize=32)  # noqa: B019 - one runtime per transformer, few grids
    def layout(self, grid: tuple[int, int, int], text_tokens: int, text_position: str) -> TokenLayout:
        return self.config.layout(*grid, text_tokens=text_tokens, text_position=text_position)

    @property
    def density(self) -> float | None:
        """Mean fraction of block pairs read over the layers' last calls (1.0 = dense), or None before a call."""
        stats = self.engine.stats
        return sum(stats.values()) / len(stats) if stats else None


class SparseProcessorBase:
    """Base of every dit_sparse attention processor.

    Subclasses compute q, k, v exactly as the stock processor does and call :meth:`attend` where the stock
    processor calls its attention function.
    """

    _attention_backend = None  # set by diffusers' set_attention_backend; used on dense calls
    _parallel_config = None

    def __init__(self, runtime: SparseRuntime, layer: int, name: str, stock=None):
        self.runtime = runtime
        self.layer = layer
        self.name = name
        # keep the stock processor's backend choices (set_attention_backend) for dense calls
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)
        if self._parallel_config is not None and not runtime.config.dense.force_dense:
            runtime.adapter.check_context_parallel()  # apply() after enable_parallelism: refuse now
            ulysses_group(self._parallel_config)  # ... and ring attention

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer}, name={self.name!r})"

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, text_tokens: int,
               dense: Callable[[], torch.Tensor], scale: float | None = None) -> torch.Tensor:
        """Sparse attention on ``[B, S, H, D]`` q/k/v in model order, or ``dense()`` (the stock call).

        Dense when: this module is not video self-attention, the grid is unknown, the token count does not match
        the grid, or the dense policy says so (warm-up step, dense layer, too few tokens, force_dense).

        Under diffusers' Ulysses context parallelism (``self._parallel_config``, set by ``enable_parallelism``)
        q/k/v hold this rank's sequence shard (``text_tokens`` is the local text count): sparse calls exchange
        them to the full sequence for ``H / N`` heads, build the plan on the full grid with the global head
        offset, and exchange back (:func:`dit_sparse.integration.parallel.ulysses_attention`); dense calls go through
        ``dense()``, whose dispatcher runs diffusers' own Ulysses attention. Ring attention raises
        ``NotImplementedError``.
        """
        rt = self.runtime
        ug = None
        if self._parallel_config is not None and not rt.config.dense.force_dense:
            rt.adapter.check_context_parallel()  # enable_parallelism after apply()
            ug = ulysses_group(self._parallel_config)  # NotImplementedError for ring attention
        world = 1 if ug is None else ug.world
        layout = self._sparse_layout(query, key, text_tokens * world, world)
        if ug is not None and checks_enabled():
            grid = rt.context.grid or (0, 0, 0)
            check_same_on_all_ranks([layout is not None, *grid, max(rt.context.step, 0), query.shape[1]], ug,
                                    f"{self.name}'s (sparse, grid, step, local tokens)", device=query.device)
        if layout is None:
            rt.calls["dense"] += 1
            return dense()
        ctx = rt.context
        rt.calls["sparse"] += 1
        kwargs = dict(layout=layout, step=max(ctx.step, 0), layer=self.layer, branch=ctx.branch, scale=scale)
        if ug is None:
            out = rt.engine.sparse_attention(query, key, value, **kwargs)
        else:
            out = ulysses_attention(rt.engine.sparse_attention, query, key, value, ug, text_tokens=text_tokens,
                                    text_position=rt.adapter.text_position or "after", **kwargs)
        if rt.track_error:
            ref = dense().float()
            err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-12))
            rt.layer_errors.setdefault(self.layer, []).append(err)
        return out

    def stock_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The stock processors' attention call on ``[B, S, H, D]``: diffusers' dispatcher with the backend and the
        context-parallel config diffusers set on this processor (what every ``dispatch_attention_fn`` processor
        runs; SD3 and CogVideoX call SDPA directly and keep their own call)."""
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def attend_valid_text(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, *, text_tokens: int, valid_text: int,
                          text_position: str) -> torch.Tensor:
        """Joint attention whose key mask leaves only the first ``valid_text`` of the ``text_tokens`` text tokens
        valid (same count in every sample; the caller checked the mask), exactly as stock:

        * sparse attention on the video plus the valid text (the padded keys dropped, which the mask zeroes in
          stock); the padded text query rows run the stock call with the mask, restricted to those rows;
        * when :meth:`attend` decides dense (warm-up, dense layer, no grid), ONE stock call covers every row, so
          dense configs stay bit-exact.

        ``text_position``: ``"before"`` (``[text, video]``) or ``"after"`` (``[video, text]``).
        """
        def stock():
            return self.stock_attention(query, key, value, attention_mask)

        if valid_text == text_tokens:  # nothing padded: the mask (if any) is all True
            return self.attend(query, key, value, text_tokens=text_tokens, dense=stock)
        if text_position == "before":
            keep, pad = (slice(0, valid_text), slice(text_tokens, None)), slice(valid_text, text_tokens)
        else:
            n_valid = query.shape[1] - text_tokens + valid_text
            keep, pad = (slice(0, n_valid),), slice(n_valid, None)

        def select(x):
            return torch.cat([x[:, s] for s in keep], dim=1) if len(keep) > 1 else x[:, keep[0]]

        full = []  # the stock output, when attend() ran the dense call

        def dense():
            full.append(stock())
            return select(full[0])

        out = self.attend(select(query), select(key), select(value), text_tokens=valid_text, dense=dense)
        if full:
            return full[0]
        rest = self.stock_attention(query[:, pad], key, value, attention_mask)
        if text_position == "before":
            return torch.cat([out[:, :valid_text], rest, out[:, valid_text:]], dim=1)
        return torch.cat([out, rest], dim=1)

    def _num_steps(self) -> int | None:
        num_steps = self.runtime.context.num_steps
        if num_steps is None and self.runtime.config.dense.dense_fraction > 0:
            warn_once("dit_sparse: dense_fraction needs the number of denoising steps, which this call does not "
                      "say (no pipeline scheduler, no cache context); only dense_steps applies. Pass "
                      "scheduler= to dit_sparse.apply or use dense_steps.", key="no-num-steps")
            num_steps = 0
        return num_steps

    def _sparse_layout(self, query: torch.Tensor, key: torch.Tensor, text_tokens: int,
                       world: int = 1) -> TokenLayout | None:
        """The layout of a call that runs sparse, or None when it runs dense.

        ``text_tokens`` counts the whole sequence's text; ``world`` > 1: q/k/v are one of ``world`` equal sequence
        shards (Ulysses), so the call covers ``world`` times their tokens.
        """
        rt = self.runtime
        ctx = rt.context
        grid = ctx.grid
        if grid is None or rt.config.dense.force_dense:
            return None
        n_video = grid[0] * grid[1] * grid[2]
        n_query, n_key = query.shape[1] * world, key.shape[1] * world
        if n_query != n_video + text_tokens or n_key != n_query:
            shards = f" ({world} context-parallel shards of {query.shape[1]})" if world > 1 else ""
            warn_once(f"dit_sparse: {self.name} got {n_query} query / {n_key} key tokens{shards}, but the "
                      f"grid {grid} plus {text_tokens} text tokens makes {n_video + text_tokens}; running this "
                      "call dense. Report this with the model and resolution.", key=f"mismatch-{self.name}")
            return None
        if rt.engine.runs_dense(step=max(ctx.step, 0), num_steps=self._num_steps(), layer=self.layer,
                                video_tokens=n_video, device_type=query.device.type):
            return None
        return rt.layout(grid, text_tokens, rt.adapter.text_position or "after")


def project_heads(attn, hidden_states: torch.Tensor, *, added: bool = False, heads_first: bool = False):
    """``query, key, value`` of one stream as ``[B, S, H, D]`` (``heads_first``: ``[B, H, S, D]``, the layout of the
    processors that call SDPA directly), with the module's q/k norms where it has them: the projection step
    diffusers' joint-attention processors share (HunyuanVideo, Qwen-Image, SD3, CogVideoX). ``added=False``: the
    latent stream (``to_q/to_k/to_v``, ``norm_q/norm_k``); ``added=True``: the text stream (``add_q_proj/add_k_proj/
    add_v_proj``, ``norm_added_q/norm_added_k``). Same operations in the same order as those processors."""
    if added:
        projections, norms = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), ("norm_added_q", "norm_added_k")
    else:
        projections, norms = (attn.to_q, attn.to_k, attn.to_v), ("norm_q", "norm_k")
    query, key, value = (p(hidden_states).unflatten(-1, (attn.heads, -1)) for p in projections)
    if heads_first:
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    norm_q, norm_k = (getattr(attn, n, None) for n in norms)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def project_out_text_last(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Stock HunyuanVideo-style output: split ``[video, text]`` and apply ``to_out`` / ``to_add_out`` where present."""
    if encoder_hidden_states is not None:
        n_text = encoder_hidden_states.shape[1]
        hidden_states, encoder_hidden_states = hidden_states[:, :-n_text], hidden_states[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


def patch_grid(module: torch.nn.Module, hidden_states: torch.Tensor, channels_first: bool = True):
    """``(frames, height, width)`` in patch tokens of a ``[B, C, F, H, W]`` (or ``[B, F, C, H, W]``) latent."""
    cfg = module.config
    p = cfg.patch_size
    if isinstance(p, (tuple, list)):
        pt, ph, pw = p
    else:
        pt, ph, pw = getattr(cfg, "patch_size_t", None) or 1, p, p
    if channels_first:
        f, h, w = hidden_states.shape[2:]
    else:
        f, h, w = hidden_states.shape[1], hidden_states.shape[3], hidden_states.shape[4]
    return (-(-f // pt), h // ph, w // pw)
