"""Cosmos (``CosmosTransformer3DModel``, Cosmos 1.0 / 2.0 / 2.5): text only in cross-attention, which stays stock.

Each block has a video self-attention ``attn1`` (always ``CosmosAttnProcessor2_0``, no text) and a cross-attention
``attn2``: ``CosmosAttnProcessor2_0`` over the text (Cosmos 1.0 / 2.0), or ``CosmosAttnProcessor2_5`` over the text
plus image context (Cosmos 2.5, ``img_context_dim_in``). Both processor versions of ``attn2`` keep their stock
processor; only ``attn1`` runs sparse, in both model versions. The processor is diffusers 0.42's
``CosmosAttnProcessor2_0`` (self-attention path) with only the attention call swapped; like stock, the dense call
passes no backend (the stock Cosmos processor ignores ``set_attention_backend``).

Grid: ``hidden_states [B, C, T, H, W]`` floor-divided by ``config.patch_size`` ``(pt, ph, pw)``, as the model
patchifies; token order (frame, row, col). No ``_cp_plan`` in diffusers 0.42.1: no context parallelism upstream.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .base import AdapterSpec, SparseProcessorBase
from .registry import FAMILIES

__all__ = ["CosmosSparseAttnProcessor", "SPEC"]


class CosmosSparseAttnProcessor(SparseProcessorBase):
    """Sparse self-attention for Cosmos ``attn1`` (``Attention`` with ``CosmosAttnProcessor2_0``)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        # 1. QKV projections
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = query.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = key.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        # 2. QK normalization
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        # 3. Apply RoPE
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)

        # 4. Prepare for GQA
        query_idx = query.size(3)
        key_idx = key.size(3)
        value_idx = value.size(3)
        key = key.repeat_interleave(query_idx // key_idx, dim=3)
        value = value.repeat_interleave(query_idx // value_idx, dim=3)

        # 5. Attention
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

        def dense() -> torch.Tensor:
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

        if cross or attention_mask is not None:
            hidden_states = dense()  # the model passes neither to attn1; never approximated
        else:
            hidden_states = self.attend(q, k, v, text_tokens=0, dense=dense)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        return hidden_states


def _grid(module, args, kwargs):
    """``(T, H, W)`` in patch tokens: ``hidden_states [B, C, T, H, W]`` floor-divided by the patch size."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None:
        return None
    pt, ph, pw = module.config.patch_size
    t, h, w = hs.shape[2:]
    return (t // pt, h // ph, w // pw)


SPEC = AdapterSpec(
    family=FAMILIES["cosmos"],
    processor_classes=("CosmosAttnProcessor2_0",),
    processor=CosmosSparseAttnProcessor,
    grid_fn=_grid,
    text_position=None,
    is_sparse_candidate=lambda name: ".attn1." in name,
)
