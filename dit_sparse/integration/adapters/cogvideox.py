"""CogVideoX 1.0 / 1.5 (``CogVideoXTransformer3DModel``): joint self-attention over ``[text, video]``, text FIRST.

Every block has one attention module (``attn1``). Its processor concatenates ``[encoder_hidden_states,
hidden_states]``, applies RoPE to the video part only (CogVideoX-5B and 1.5; 2B has no RoPE and adds sin-cos
position embeddings in the patch embedding instead) and calls ``F.scaled_dot_product_attention`` directly, in the
``[B, H, S, D]`` layout. The processor below is diffusers 0.42's ``CogVideoXAttnProcessor2_0`` (or
``FusedCogVideoXAttnProcessor2_0`` after ``fuse_qkv_projections()``) with only that call swapped: q, k and v go to
the engine as transposed views ``[B, S, H, D]`` in model order (text first), and dense calls run the very same SDPA
call as stock.

Grid: ``hidden_states`` is ``[B, F, C, H, W]``; patches are ``patch_size_t`` frames (None means 1; CogVideoX1.5
uses 2, and its pipelines pad the latent frames to a multiple of it before calling the transformer, so the frame
count the transformer sees is always divisible) by ``patch_size`` x ``patch_size`` pixels of the latent.
The pipelines batch classifier-free guidance (batch 2, cache context ``"cond_uncond"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from .base import AdapterSpec, SparseProcessorBase, patch_grid, project_heads
from .registry import FAMILIES

__all__ = ["CogVideoXSparseAttnProcessor", "SPEC"]


class CogVideoXSparseAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for CogVideoX's ``attn1``; keyword call, parameter names as in the stock processor.

    ``fused`` mirrors ``FusedCogVideoXAttnProcessor2_0`` (one ``to_qkv`` projection); it is set when the replaced
    stock processor is the fused one.
    """

    def __init__(self, runtime, layer, name, stock=None, fused: bool = False):
        super().__init__(runtime, layer, name, stock)
        self.fused = fused

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        text_seq_length = encoder_hidden_states.size(1)

        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        batch_size, sequence_length, _ = encoder_hidden_states.shape if self.fused else hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if self.fused:
            qkv = attn.to_qkv(hidden_states)
            split_size = qkv.shape[-1] // 3
            query, key, value = (t.view(batch_size, -1, attn.heads, split_size // attn.heads).transpose(1, 2)
                                 for t in torch.split(qkv, split_size, dim=-1))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
        else:
            query, key, value = project_heads(attn, hidden_states, heads_first=True)

        if image_rotary_emb is not None:
            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        def dense() -> torch.Tensor:  # the stock call, returned as [B, S, H, D]
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False).transpose(1, 2)

        if attention_mask is not None or attn.is_cross_attention:
            hidden_states = dense()  # no CogVideoX model passes either; never approximated
        else:
            hidden_states = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        text_tokens=text_seq_length, dense=dense)

        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * query.shape[-1])

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _make_processor(runtime, layer, name, stock):
    fused = type(stock).__name__ == "FusedCogVideoXAttnProcessor2_0"
    return CogVideoXSparseAttnProcessor(runtime, layer, name, stock, fused=fused)


def _grid(module, args, kwargs):
    hs = kwargs.get("hidden_states", args[0] if args else None)
    return None if hs is None else patch_grid(module, hs, channels_first=False)


SPEC = AdapterSpec(
    family=FAMILIES["cogvideox"],
    processor_classes=("CogVideoXAttnProcessor2_0", "FusedCogVideoXAttnProcessor2_0"),
    processor=_make_processor,
    grid_fn=_grid,
    text_position="before",
    is_sparse_candidate=lambda name: ".attn1." in name,
)
