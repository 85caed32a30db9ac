"""Wan2.1 / Wan2.2 (``WanTransformer3DModel``): text only in cross-attention (``attn2``), which stays stock.

Self-attention ``attn1`` of every block runs sparse. Wan2.2 pipelines have ``transformer_2`` too; ``apply``
handles both. The processor below is diffusers 0.42's ``WanAttnProcessor`` for self-attention, with only the
attention call swapped (image-conditioning keys of I2V live in cross-attention and are untouched).

The Wan-derived models reuse this processor and grid unchanged (their self-attention processors are copies of
``WanAttnProcessor``: same projections, norms and RoPE): ``wan_vace.py``, ``wan_animate.py``, ``skyreels_v2.py``
declare only their class names.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from .base import AdapterSpec, SparseProcessorBase, patch_grid
from .registry import FAMILIES


def _apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanSparseAttnProcessor(SparseProcessorBase):
    """Sparse self-attention for ``WanAttention`` (``attn1``). Positional call, like the stock processor."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise NotImplementedError(f"{type(self).__name__} serves Wan self-attention (attn1) only, but "
                                      f"{self.name} received encoder_hidden_states; cross-attention keeps the "
                                      "stock WanAttnProcessor.")
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary_emb(query, *rotary_emb)
            key = _apply_rotary_emb(key, *rotary_emb)

        def dense():
            return self.stock_attention(query, key, value, attention_mask)

        if attention_mask is not None:
            hidden_states = dense()
        else:
            hidden_states = self.attend(query, key, value, text_tokens=0, dense=dense)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _grid(module, args, kwargs):
    hs = kwargs.get("hidden_states", args[0] if args else None)
    return None if hs is None else patch_grid(module, hs)


SPEC = AdapterSpec(
    family=FAMILIES["wan"],
    processor_classes=("WanAttnProcessor", "WanAttnProcessor2_0"),
    processor=WanSparseAttnProcessor,
    grid_fn=_grid,
    text_position=None,
    is_sparse_candidate=lambda name: ".attn1." in name,
)
