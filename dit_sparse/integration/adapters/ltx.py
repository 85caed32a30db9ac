"""LTX-Video (``LTXVideoTransformer3DModel``): text only in cross-attention (``attn2``), which stays stock.

Self-attention ``attn1`` of every block runs sparse. The processor below is diffusers 0.42's
``LTXVideoAttnProcessor`` with only the attention call swapped: RMS norms over all heads and RoPE (``(cos, sin)``,
each ``[B, N, inner_dim]``) act BEFORE the head split, exactly as stock; q, k and v then go to the engine in the
dispatcher layout ``[B, N, H, D]``. Cross-attention or a mask (never passed to ``attn1`` by the model) run the stock
dispatcher call.

Grid: latents arrive packed as ``[B, N, C]``, so the grid comes from the forward's ``num_frames``, ``height`` and
``width`` keyword arguments. They count RoPE positions, one per token (the rotary embedding builds
``num_frames * height * width`` positions for the ``N`` tokens), i.e. they are already in patch tokens: with the
``patch_size = patch_size_t = 1`` of every LTX-Video checkpoint, latent units. When the positions come from
``video_coords`` instead (``LTXConditionPipeline``, ``LTXI2VLongMultiPromptPipeline``: conditioning tokens may be
prepended to the video tokens, and the latter passes ``num_frames = height = width = 1``), the token order is not
known to be a grid, so every call stays dense (stock attention), whatever else is passed.
The pipelines batch classifier-free guidance (batch 2, cache context ``"cond_uncond"``).
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from .base import AdapterSpec, SparseProcessorBase
from .registry import FAMILIES

__all__ = ["LTXSparseAttnProcessor", "SPEC"]

# positions of the grid arguments in LTXVideoTransformer3DModel.forward
_FORWARD_ARGS = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "num_frames",
                 "height", "width", "rope_interpolation_scale", "video_coords")


class LTXSparseAttnProcessor(SparseProcessorBase):
    """Sparse self-attention for ``LTXAttention`` (``attn1``). Positional call, like the stock processor."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        def dense() -> torch.Tensor:
            return self.stock_attention(query, key, value, attention_mask)

        if cross or attention_mask is not None:
            hidden_states = dense()  # the model passes neither to attn1; never approximated
        else:
            hidden_states = self.attend(query, key, value, text_tokens=0, dense=dense)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _grid(module, args, kwargs):
    """``(num_frames, height, width)`` from the forward's arguments, or None (``video_coords`` or missing)."""
    def arg(name):
        i = _FORWARD_ARGS.index(name)
        return kwargs[name] if name in kwargs else (args[i] if len(args) > i else None)

    if arg("video_coords") is not None:
        return None
    grid = tuple(arg(n) for n in ("num_frames", "height", "width"))
    if any(g is None for g in grid):
        return None
    return tuple(int(g) for g in grid)


SPEC = AdapterSpec(
    family=FAMILIES["ltx"],
    processor_classes=("LTXVideoAttnProcessor",),
    processor=LTXSparseAttnProcessor,
    grid_fn=_grid,
    text_position=None,
    is_sparse_candidate=lambda name: ".attn1." in name,
)
