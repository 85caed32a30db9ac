"""Kandinsky 6 (``Kandinsky6Transformer3DModel``): text (and audio) only in cross-attention, which stays stock.

One processor class (``Kandinsky6AttnProcessor``) serves every attention module of the model: the text branches'
self-attention, the video and audio decoder blocks' self- and cross-attention, and the audio-video cross paths.
Only the video self-attention ``visual_transformer_blocks.*.video_dec_block.self_attention`` runs sparse; every
other module keeps its stock processor object. The processor is diffusers 0.42's ``Kandinsky6AttnProcessor`` with
only the attention call swapped; a mask or ``encoder_hidden_states`` (never passed to the video self-attention by
the model) keeps the stock call.

Grid: ``hidden_states [B, T, H, W, C]`` divided by ``config.patch_size`` ``(pt, ph, pw)``; the model flattens the
patch grid (T, H, W) row-major. A reference frame appended by the image-to-video pipeline is one more latent frame
of the grid (its RoPE position differs; the token order does not). No ``_cp_plan`` in diffusers 0.42.1.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_kandinsky6 import apply_rotary

from .base import AdapterSpec, SparseProcessorBase
from .registry import FAMILIES

__all__ = ["Kandinsky6SparseAttnProcessor", "SPEC"]


class Kandinsky6SparseAttnProcessor(SparseProcessorBase):
    """Sparse video self-attention for ``Kandinsky6Attention`` (``video_dec_block.self_attention``)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 rotary_emb: torch.Tensor | None = None, rotary_emb_kv: torch.Tensor | None = None,
                 attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        query = attn.to_query(hidden_states)
        if encoder_hidden_states is None:
            key = attn.to_key(hidden_states)
            value = attn.to_value(hidden_states)
        else:
            key = attn.to_key(encoder_hidden_states)
            value = attn.to_value(encoder_hidden_states)

        query = query.reshape(*query.shape[:-1], attn.num_heads, -1)
        key = key.reshape(*key.shape[:-1], attn.num_heads, -1)
        value = value.reshape(*value.shape[:-1], attn.num_heads, -1)
        query = attn.query_norm(query)
        key = attn.key_norm(key)

        if rotary_emb is not None:
            query = apply_rotary(query, rotary_emb).to(dtype=query.dtype)
        if rotary_emb_kv is not None:
            key = apply_rotary(key, rotary_emb_kv).to(dtype=key.dtype)

        def dense() -> torch.Tensor:
            # the stock call passes no dropout / causal flags: the dispatcher's defaults (0.0, False)
            return self.stock_attention(query, key, value, attn_mask)

        if cross or attn_mask is not None or query.ndim != 4:
            output = dense()
        else:
            output = self.attend(query, key, value, text_tokens=0, dense=dense)

        return attn.out_layer(output.flatten(-2, -1))


def _grid(module, args, kwargs):
    """``(T, H, W)`` in patch tokens of ``hidden_states [B, T, H, W, C]``."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None or hs.ndim != 5:
        return None
    pt, ph, pw = module.config.patch_size
    t, h, w = hs.shape[1:4]
    return (t // pt, h // ph, w // pw)


SPEC = AdapterSpec(
    family=FAMILIES["kandinsky6"],
    processor_classes=("Kandinsky6AttnProcessor",),
    processor=Kandinsky6SparseAttnProcessor,
    grid_fn=_grid,
    text_position=None,
    is_sparse_candidate=lambda name: ".video_dec_block.self_attention." in name,
)
