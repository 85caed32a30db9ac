"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint attention with the text LAST.

``JointAttnProcessor2_0`` concatenates ``[image, text]`` and calls ``F.scaled_dot_product_attention`` directly
(no dispatcher), in ``[B, H, S, D]`` layout; the dense path here makes the very same call. The last block is
``context_pre_only`` (no ``to_add_out``; its text output is dropped by the block). SD3.5's dual-attention blocks
(``dual_attention_layers``) have a second, image-only self-attention ``attn2`` (no ``encoder_hidden_states``):
it runs sparse too, with no text tokens. The stock processor ignores ``attention_mask``; so does this one.

The grid is ``(1, H / patch, W / patch)`` of the latent ``hidden_states [B, C, H, W]``. The pipeline batches CFG
(``[uncond, cond]`` in one call, no cache context): both samples go through one sparse call, per-sample plans.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AdapterSpec, SparseProcessorBase, project_heads
from .registry import FAMILIES


class SD3SparseJointAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for SD3's ``Attention`` (``attn``, and ``attn2`` of dual-attention blocks)."""

    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 attention_mask: torch.FloatTensor | None = None, *args, **kwargs) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query, key, value = project_heads(attn, hidden_states, heads_first=True)

        # `context` projections.
        text_tokens = 0
        if encoder_hidden_states is not None:
            (encoder_hidden_states_query_proj, encoder_hidden_states_key_proj,
             encoder_hidden_states_value_proj) = project_heads(attn, encoder_hidden_states, added=True,
                                                               heads_first=True)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)
            text_tokens = encoder_hidden_states_query_proj.shape[2]

        def dense():  # the stock call, returned as [B, S, H, D]
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False).transpose(1, 2)

        # attend() takes [B, S, H, D]: transposed views, no copies
        hidden_states = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                    text_tokens=text_tokens, dense=dense)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def latent_grid(module, args, kwargs):
    """``(1, H / patch, W / patch)`` of the ``[B, C, H, W]`` latent (SD3's PatchEmbed is a strided conv)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None or not torch.is_tensor(hs) or hs.ndim != 4:
        return None
    p = module.config.patch_size
    return (1, hs.shape[-2] // p, hs.shape[-1] // p)


SPEC = AdapterSpec(
    family=FAMILIES["sd3"],
    processor_classes=("JointAttnProcessor2_0",),
    processor=SD3SparseJointAttnProcessor,
    grid_fn=latent_grid,
    text_position="after",
    is_sparse_candidate=lambda name: name.startswith("transformer_blocks."),
)
