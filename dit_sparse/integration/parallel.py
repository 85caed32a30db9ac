"""Context parallelism: dit_sparse processors under diffusers' Ulysses attention (``ContextParallelConfig``).

diffusers 0.42 shards the token sequence of a transformer across ranks (``transformer.enable_parallelism(
config=ContextParallelConfig(ulysses_degree=N))``) and hands every attention processor a ``_parallel_config``. With
**Ulysses**, an all-to-all turns the sequence-sharded ``[B, S/N, H, D]`` q/k/v into head-sharded ``[B, S, H/N, D]``:
every rank then holds the FULL sequence for ``H/N`` heads, so a block plan over the full latent grid can be built
and executed locally. Rank ``r`` of the Ulysses group holds heads ``r * H/N ... (r + 1) * H/N - 1`` (diffusers'
order), so per-head state (``DensePolicy.dense_heads``, per-head neighbourhood windows) is looked up at the global
head ``head_offset + local head``. Every selector is per head (draft maps, rectification, reuse, Re-ttention), so
the plans equal the single-process plans head by head.

**Ring** attention (``ring_degree > 1``, alone or unified with Ulysses) keeps each rank's queries local and streams
the keys around the ring: no rank ever holds the full key sequence, so a block plan over it cannot run locally.
It raises ``NotImplementedError`` (:func:`ulysses_group`).

Where a call runs sparse, :meth:`dit_sparse.integration.adapters.base.SparseProcessorBase.attend` calls
:func:`ulysses_attention` (our own all-to-alls with :func:`torch.distributed.all_to_all_single`, same layout as
diffusers' ``TemplatedUlyssesAttention``); dense calls keep going through diffusers' dispatcher with the parallel
config, which runs the stock Ulysses attention itself. The dense/sparse decision depends only on rank-independent
inputs (grid, step, layer, token count), so every rank takes the same branch and issues the same collectives;
``DIT_SPARSE_CHECKS=1`` verifies that with one small all-reduce per call (:func:`check_same_on_all_ranks`).

Supported order (see :func:`dit_sparse.apply`): ``transformer.enable_parallelism(...)`` **then**
``dit_sparse.apply(...)`` (recommended: the processors copy the stock processors' parallel config and the context
hook runs before diffusers' input-splitting hooks). ``apply`` then ``enable_parallelism`` also works for Wan and LTX
(diffusers sets ``_parallel_config`` on our processors; their grid comes from inputs diffusers does not split).

The all-to-alls are forward-only (inference): they are not differentiable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["UlyssesGroup", "ulysses_group", "RING_NOT_SUPPORTED", "seq_to_head", "head_to_seq",
           "model_order_index", "ulysses_attention", "check_same_on_all_ranks", "carry_parallel_config"]

RING_NOT_SUPPORTED = (
    "dit_sparse supports diffusers' context parallelism with Ulysses only (ContextParallelConfig(ulysses_degree=N)): "
    "after the Ulysses all-to-all every rank holds the full sequence for H/N of the heads, so the block plan over "
    "the full latent grid is built and executed locally. Ring attention (ring_degree={ring}) splits the key "
    "sequence across ranks and streams key/value chunks around the ring, so no rank ever holds the full key "
    "sequence and a block plan over it cannot be executed locally. Use ContextParallelConfig(ulysses_degree=N, "
    "ring_degree=1), or DensePolicy(force_dense=True) (stock attention) with ring attention."
)


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses process group of one parallel config: ``world`` ranks, this process is ``rank`` in it."""

    group: object
    world: int
    rank: int

    def head_offset(self, local_heads: int) -> int:
        """Global index of this rank's first head when every rank holds ``local_heads`` heads."""
        return self.rank * local_heads


def ulysses_group(parallel_config) -> UlyssesGroup | None:
    """The Ulysses group of a diffusers ``ParallelConfig`` (or ``ContextParallelConfig``), or None without CP.

    None when ``parallel_config`` is None, has no context-parallel part, or its Ulysses degree is 1 (nothing to
    exchange). Raises ``NotImplementedError`` for ring attention (``ring_degree > 1``) and for
    ``ulysses_anything=True`` (uneven sequence / head splits), ``RuntimeError`` when the config was never set up
    (``enable_parallelism`` not called).
    """
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None or not hasattr(cp, "ulysses_degree"):
        return None
    ring = int(cp.ring_degree or 1)
    if ring > 1:
        raise NotImplementedError(RING_NOT_SUPPORTED.format(ring=ring))
    world = int(cp.ulysses_degree or 1)
    if world <= 1:
        return None
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError(
            "dit_sparse does not support ContextParallelConfig(ulysses_anything=True) (uneven sequence and head "
            "splits) on sparse calls; use ulysses_anything=False with a head count and token count divisible by "
            "ulysses_degree.")
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None:
        raise RuntimeError("The context-parallel config has no Ulysses mesh: it was not set up. Enable it with "
                           "transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N)).")
    group = mesh.get_group()
    rank = getattr(cp, "_ulysses_local_rank", None)
    if rank is None:
        rank = dist.get_rank(group)
    return UlyssesGroup(group=group, world=world, rank=int(rank))


# ---------------------------------------------------------------------------------------------- all-to-alls
def _exchange(send: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of ``send`` ``[world, ...]`` (contiguous): chunk ``r`` goes to rank ``r``; returns what arrived."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


def seq_to_head(x: torch.Tensor, ug: UlyssesGroup) -> torch.Tensor:
    """Sequence-sharded ``[B, S_local, H, D]`` -> head-sharded ``[B, world * S_local, H / world, D]``.

    Rank ``r`` receives heads ``r * H/world ... (r+1) * H/world - 1``; the sequence is the ranks' local sequences
    concatenated in rank order (diffusers' ``TemplatedUlyssesAttention`` layout).
    """
    b, s, h, d = x.shape
    if h % ug.world:
        raise ValueError(f"Ulysses context parallelism needs the head count ({h}) to be divisible by "
                         f"ulysses_degree ({ug.world}).")
    hl = h // ug.world
    if ug.world == 1:
        return x
    send = x.reshape(b, s, ug.world, hl, d).permute(2, 0, 1, 3, 4).contiguous()  # [world, B, S_l, H_l, D]
    recv = _exchange(send, ug.group)  # [world (source rank = sequence chunk), B, S_l, H_l, D]
    return recv.permute(1, 0, 2, 3, 4).reshape(b, ug.world * s, hl, d)


def head_to_seq(x: torch.Tensor, ug: UlyssesGroup) -> torch.Tensor:
    """Inverse of :func:`seq_to_head`: head-sharded ``[B, S, H_local, D]`` -> ``[B, S / world, world * H_local, D]``.
    """
    b, s, hl, d = x.shape
    if ug.world == 1:
        return x
    if s % ug.world:
        raise ValueError(f"head_to_seq: sequence length {s} is not divisible by ulysses_degree {ug.world}.")
    sl = s // ug.world
    send = x.reshape(b, ug.world, sl, hl, d).permute(1, 0, 2, 3, 4).contiguous()  # [world (seq chunk), B, S_l, H_l, D]
    recv = _exchange(send, ug.group)  # [world (source rank = head chunk), B, S_l, H_l, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, sl, ug.world * hl, d)


@functools.lru_cache(maxsize=64)
def _order(world: int, local_len: int, text_local: int, text_position: str, device: str):
    starts = torch.arange(world, device=device).view(-1, 1) * local_len
    text = torch.arange(text_local, device=device).view(1, -1)
    video = torch.arange(local_len - text_local, device=device).view(1, -1)
    if text_position == "before":
        idx = torch.cat([(starts + text).flatten(), (starts + text_local + video).flatten()])
    else:
        idx = torch.cat([(starts + video).flatten(), (starts + (local_len - text_local) + text).flatten()])
    return idx, torch.argsort(idx)


def model_order_index(world: int, local_len: int, text_local: int, text_position: str,
                      device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_model, to_gathered)`` index tensors for a gathered sequence that holds text.

    After :func:`seq_to_head` the sequence is the ranks' local sequences in rank order. When each rank holds
    ``[text_r, video_r]`` (``"before"``) or ``[video_r, text_r]`` (``"after"``) with the text and the video each
    split contiguously across ranks (diffusers' CP plans split ``encoder_hidden_states`` and ``hidden_states``
    separately), ``gathered[:, to_model]`` is the model order ``[text, video]`` (or ``[video, text]``) and
    ``model[:, to_gathered]`` goes back.
    """
    if text_position not in ("before", "after"):
        raise ValueError(f"text_position must be 'before' or 'after', got {text_position!r}.")
    if not 0 <= text_local <= local_len:
        raise ValueError(f"text_local must be in [0, {local_len}], got {text_local}.")
    return _order(int(world), int(local_len), int(text_local), text_position, str(torch.device(device)))


def ulysses_attention(engine, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ug: UlyssesGroup, *,
                      text_tokens: int = 0, text_position: str = "after", **engine_kwargs) -> torch.Tensor:
    """Run a :class:`~dit_sparse.SparseAttention` call on sequence-sharded q/k/v under Ulysses.

    Args:
        engine: the call to run on the full sequence, e.g. :meth:`~dit_sparse.SparseAttention.sparse_attention`
            (called with ``head_offset`` and ``total_heads``).
        query, key, value: this rank's ``[B, S_local, H, D]`` in model order (``S_local`` equal on every rank).
        ug: the Ulysses group (:func:`ulysses_group`).
        text_tokens: text tokens in THIS rank's local sequence (``text_position`` says where).
        **engine_kwargs: ``layout`` (the FULL grid and ``world * text_tokens`` text), ``step``, ``layer``, ...

    Returns:
        This rank's ``[B, S_local, H, D]`` output, as the stock Ulysses attention returns it.
    """
    heads = query.shape[2]
    q, k, v = (seq_to_head(t, ug) for t in (query, key, value))
    order = None
    if text_tokens and ug.world > 1:
        order = model_order_index(ug.world, query.shape[1], text_tokens, text_position, q.device)
        q, k, v = (t.index_select(1, order[0]) for t in (q, k, v))
    out = engine(q, k, v, head_offset=ug.head_offset(q.shape[2]), total_heads=heads, **engine_kwargs)
    if order is not None:
        out = out.index_select(1, order[1])
    return head_to_seq(out.contiguous(), ug)


def check_same_on_all_ranks(values: list[int], ug: UlyssesGroup, what: str,
                            device: torch.device | str = "cpu") -> None:
    """Raise ``RuntimeError`` unless ``values`` (small ints) are equal on every rank of the group (all-reduce).

    ``device``: where the group's backend wants tensors (the activations' device: CUDA for NCCL).
    """
    t = torch.tensor(values, dtype=torch.int64, device=device)
    hi, lo = t.clone(), t.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=ug.group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=ug.group)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"dit_sparse: ranks of the Ulysses group disagree on {what}: this rank {values}, min "
                           f"{lo.tolist()}, max {hi.tolist()}. Every rank must see the same latent grid and step; "
                           "apply dit_sparse after transformer.enable_parallelism(...) so its context hook reads "
                           "the unsplit inputs.")


def carry_parallel_config(current: dict, original: dict) -> None:
    """Before ``remove()`` restores ``original`` processors: give them the parallel config ours received.

    ``enable_parallelism`` after ``apply`` sets ``_parallel_config`` on the processors installed then (ours); the
    stock processors kept aside would come back without it and silently attend only their sequence shard.
    """
    for name, proc in original.items():
        cfg = getattr(current.get(name), "_parallel_config", None)
        if cfg is not None and hasattr(proc, "_parallel_config") and proc._parallel_config is None:
            proc._parallel_config = cfg
