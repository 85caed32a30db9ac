"""FLUX.2 (``Flux2Transformer2DModel``, FLUX.2 [dev] and [klein]): joint attention, text FIRST, both block kinds.

* Double-stream blocks (``transformer_blocks.*.attn``, ``Flux2AttnProcessor``) get image ``hidden_states`` and text
  ``encoder_hidden_states`` separately; the processor concatenates ``[text, image]``.
* Single-stream blocks (``single_transformer_blocks.*.attn``, ``Flux2ParallelSelfAttnProcessor``: fused QKV + MLP
  input projection, fused output) get ``[text, image]`` as ONE tensor: the text length is the total minus the image
  tokens of the grid.

Both run sparse; RoPE covers text + image and is applied before the attention call, as in stock. The grid
``(1, rows, cols)`` comes from the forward's 4-axis ``img_ids`` (T, H, W, L) through the FLUX.1 adapter's
:func:`~dit_sparse.integration.adapters.flux.image_grid`: only trusted when the H, W ids are exactly the row-major grid
of the packed latent ``hidden_states [B, N, C]``. Reference-image tokens (FLUX.2 editing: extra tokens with their own T
offset) give no grid, so every call runs the stock attention. The KV-cache processors of the klein-KV pipeline
(``Flux2KVAttnProcessor``, ``Flux2KVParallelSelfAttnProcessor``) are not served.

Context parallelism (Ulysses): the model has a ``_cp_plan`` sharding text and image tokens; a single-stream call then
holds ``[text shard, image shard]`` and its text count is derived from the whole sequence (``world`` shards). Call
``enable_parallelism`` before ``apply`` so the grid is read from the full ``img_ids``; in the other order the grid
comes from a shard, the token counts disagree with it and every call runs the stock attention (on every rank).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

from ..parallel import ulysses_group
from .base import AdapterSpec, SparseProcessorBase
from .flux import image_grid, joint_qkv_text_first
from .registry import FAMILIES

__all__ = ["Flux2SparseAttnProcessor", "Flux2SparseParallelSelfAttnProcessor", "SPEC"]


class _TextFirst(SparseProcessorBase):
    def _run(self, query, key, value, attention_mask, text_tokens: int | None) -> torch.Tensor:
        def dense():
            return self.stock_attention(query, key, value, attention_mask)

        if attention_mask is not None or text_tokens is None:
            return dense()
        return self.attend(query, key, value, text_tokens=text_tokens, dense=dense)

    def _joint_text_tokens(self, query: torch.Tensor) -> int:
        """Text tokens in front of a ``[text, image]`` query whose text length the call does not say.

        Under Ulysses the query is this rank's shard ``[text shard, image shard]``: the whole sequence is ``world``
        shards, and the count returned is the local text (``attend`` multiplies it by ``world``).
        """
        grid = self.runtime.context.grid
        if grid is None:
            return 0  # attend() runs it dense (no grid)
        world = 1
        if self._parallel_config is not None and not self.runtime.config.dense.force_dense:
            ug = ulysses_group(self._parallel_config)
            world = 1 if ug is None else ug.world
        text = query.shape[1] * world - grid[0] * grid[1] * grid[2]
        if text < 0 or text % world:
            return 0  # fails attend()'s token check -> dense
        if world > 1 and text // world != getattr(self.runtime, "_flux2_local_text", None):
            # the grid was read from sharded ids (apply() before enable_parallelism): every rank runs stock
            return 0
        return text // world


class Flux2SparseAttnProcessor(_TextFirst):
    """Sparse joint attention for ``Flux2Attention`` (double-stream blocks). Positional call."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = joint_qkv_text_first(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                                 _get_qkv_projections)

        if encoder_hidden_states is not None:
            # the processor itself put the text in front (only with the added projections)
            text_tokens = encoder_hidden_states.shape[1] if attn.added_kv_proj_dim is not None else None
            self.runtime._flux2_local_text = text_tokens  # what the single-stream blocks of this forward hold
        else:
            text_tokens = self._joint_text_tokens(query)
        hidden_states = self._run(query, key, value, attention_mask, text_tokens)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class Flux2SparseParallelSelfAttnProcessor(_TextFirst):
    """Sparse attention for ``Flux2ParallelSelfAttention`` (single-stream blocks, ``[text, image]``). Positional."""

    def __call__(self, attn, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        # Parallel in (QKV + MLP in) projection
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)

        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)

        # Handle the attention logic
        query, key, value = qkv.chunk(3, dim=-1)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self._run(query, key, value, attention_mask, self._joint_text_tokens(query))
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # Handle the feedforward (FF) logic
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)

        # Concatenate and parallel output projection
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        hidden_states = attn.to_out(hidden_states)

        return hidden_states


def _make_processor(runtime, layer, name, stock):
    cls = (Flux2SparseParallelSelfAttnProcessor if type(stock).__name__ == "Flux2ParallelSelfAttnProcessor"
           else Flux2SparseAttnProcessor)
    return cls(runtime, layer, name, stock)


SPEC = AdapterSpec(
    family=FAMILIES["flux2"],
    processor_classes=("Flux2AttnProcessor", "Flux2ParallelSelfAttnProcessor"),
    processor=_make_processor,
    grid_fn=image_grid,
    text_position="before",
    is_sparse_candidate=lambda name: name.endswith(".attn.processor"),
)
