"""LTX-2 (``LTX2VideoTransformer3DModel``): video self-attention sparse; text, audio and audio-video paths stock.

Each block has eight attention modules. Only the video self-attention ``transformer_blocks.*.attn1`` runs sparse;
``attn2`` (video-text), ``audio_attn1`` / ``audio_attn2`` (audio self / audio-text) and the audio-video cross paths
(``audio_to_video_attn``, ``video_to_audio_attn``) keep their stock processors. Both stock processor classes of
``attn1`` are served: ``LTX2AudioVideoAttnProcessor`` and ``LTX2PerturbedAttnProcessor`` (``perturbed_attn=True``,
LTX-2.3). The processor below is the perturbed one with only the attention call swapped; without a perturbation
mask it computes exactly what ``LTX2AudioVideoAttnProcessor`` computes. RMS norms over all heads and RoPE
(interleaved or split, ``rope_type``) act before the head split, the per-head output gate (``gated_attn``) after,
as in stock. A self-attention mask (``video_self_attention_mask``) keeps the stock call.

Grid: latents arrive packed ``[B, N, C]``; the forward's ``num_frames``, ``height``, ``width`` are latent sizes
and the token grid is ``ceil(size / patch)`` per axis (the model's ``prepare_video_coords``). The pipelines also pass
``video_coords``: the grid is only trusted when those are exactly the coordinates the model itself would build
from ``(num_frames, height, width, fps)``; otherwise (conditioning pipelines that
prepend or move tokens) every call runs the stock attention.

Context parallelism: refused for sparse configs (``AdapterSpec.context_parallel``: ``NotImplementedError`` at
``apply`` after ``enable_parallelism``, or at the first sparse call when parallelism is enabled after ``apply``).
diffusers 0.42.1's own ``_cp_plan`` for this model does not run: it shards the video tokens and the output of
``rope`` but not the audio-video cross-attention RoPE (``cross_attn_rope``), so the stock model fails in
``audio_to_video_attn`` under Ulysses (checked on CPU with gloo); it also requires ``encoder_attention_mask``, whose
sharded use then fails in the cross-attention mask broadcast.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

from ..context import host_memo
from .base import AdapterSpec, SparseProcessorBase
from .registry import FAMILIES

__all__ = ["LTX2SparseAttnProcessor", "SPEC"]


class LTX2SparseAttnProcessor(SparseProcessorBase):
    """Sparse video self-attention for ``LTX2Attention`` (``attn1``). Positional call, like the stock processors."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 query_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 key_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 perturbation_mask: torch.Tensor | None = None,
                 all_perturbed: bool | None = None) -> torch.Tensor:
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        if attn.to_gate_logits is not None:
            # Calculate gate logits on original hidden_states
            gate_logits = attn.to_gate_logits(hidden_states)

        value = attn.to_v(encoder_hidden_states)
        if all_perturbed is None and perturbation_mask is not None:  # stock reads it per call; here once per mask
            all_perturbed = host_memo("an all-perturbed batch skips the attention (stock decides on the host)",
                                      perturbation_mask, None, lambda: bool(torch.all(perturbation_mask == 0)))

        if all_perturbed:
            # Skip attention, use the value projection value
            hidden_states = value
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(encoder_hidden_states)

            query = attn.norm_q(query)
            key = attn.norm_k(key)

            if query_rotary_emb is not None:
                if attn.rope_type == "interleaved":
                    query = apply_interleaved_rotary_emb(query, query_rotary_emb)
                    key = apply_interleaved_rotary_emb(
                        key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
                    )
                elif attn.rope_type == "split":
                    query = apply_split_rotary_emb(query, query_rotary_emb)
                    key = apply_split_rotary_emb(
                        key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb
                    )

            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            value = value.unflatten(2, (attn.heads, -1))

            def dense() -> torch.Tensor:
                return self.stock_attention(query, key, value, attention_mask)

            if cross or attention_mask is not None:
                hidden_states = dense()  # a masked (or cross) call is never approximated
            else:
                hidden_states = self.attend(query, key, value, text_tokens=0, dense=dense)
            hidden_states = hidden_states.flatten(2, 3)
            hidden_states = hidden_states.to(query.dtype)

            if perturbation_mask is not None:
                value = value.flatten(2, 3)
                hidden_states = torch.lerp(value, hidden_states, perturbation_mask)

        if attn.to_gate_logits is not None:
            hidden_states = hidden_states.unflatten(2, (attn.heads, -1))  # [B, T, H, D]
            # The factor of 2.0 is so that if the gates logits are zero-initialized the initial gates are all 1
            gates = 2.0 * torch.sigmoid(gate_logits)  # [B, T, H]
            hidden_states = hidden_states * gates.unsqueeze(-1)
            hidden_states = hidden_states.flatten(2, 3)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _forward_args(module, args, kwargs) -> dict:
    sig = inspect.signature(type(module).forward)
    try:
        return sig.bind_partial(module, *args, **kwargs).arguments
    except TypeError:
        return {}


def _grid(module, args, kwargs):
    """Token grid ``ceil((num_frames, height, width) / patch)``, when ``video_coords`` (if any) are the default."""
    a = _forward_args(module, args, kwargs)
    hs, sizes = a.get("hidden_states"), [a.get(n) for n in ("num_frames", "height", "width")]
    if hs is None or hs.ndim != 3 or any(s is None for s in sizes):
        return None
    f, h, w = (int(s) for s in sizes)
    rope = module.rope
    grid = (-(-f // rope.patch_size_t), -(-h // rope.patch_size), -(-w // rope.patch_size))
    coords = a.get("video_coords")
    if coords is not None:
        fps = a.get("fps", 24.0)

        def is_default() -> bool:
            default = rope.prepare_video_coords(hs.shape[0], f, h, w, coords.device, fps=fps)
            return coords.shape == default.shape and torch.equal(coords, default.to(coords.dtype))

        # one host read per coords tensor (a pipeline passes the same one at every step)
        if not host_memo("the grid decides the layout: video_coords must be the default ones", coords,
                         (hs.shape[0], f, h, w, fps), is_default):
            return None
    return grid


SPEC = AdapterSpec(
    family=FAMILIES["ltx2"],
    processor_classes=("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor"),
    processor=LTX2SparseAttnProcessor,
    grid_fn=_grid,
    text_position=None,
    is_sparse_candidate=lambda name: ".attn1." in name,
    context_parallel="diffusers 0.42.1's own context-parallel plan for LTX-2 does not run (the audio-video "
                     "cross-attention RoPE is not sharded with the tokens; the stock model fails under Ulysses)",
)
