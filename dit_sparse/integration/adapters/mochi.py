"""Mochi (``MochiTransformer3DModel``): asymmetric joint attention, text LAST, per-sample valid text.

Every block's ``attn1`` (``MochiAttention`` with ``MochiAttnProcessor2_0``) is joint attention with separate
(asymmetric: narrower) text weights ``add_*_proj``; the last block is ``context_pre_only`` (no ``to_add_out``). The
stock processor loops over the batch: for each sample it keeps only the text tokens its ``[B, text]`` mask marks
valid (any pattern, gathered with ``nonzero`` in every call; here read once per mask tensor, so once per
generation: :func:`~dit_sparse.integration.context.host_memo`), attends over ``[video, valid text]`` with plain SDPA
and pads the rest with zeros. This processor does the same loop with the SDPA call swapped for :meth:`attend`, so text
position and masks are exact by construction: text = the sample's valid tokens, after the video.

Like stock, every sample is its own attention call; with a batch > 1 the engine's per-(layer, branch) state is
kept per sample (branch ``(branch, sample)``), so batched CFG (the pipeline's ``"cond_uncond"`` context) never mixes
the two samples' plans.

RoPE (interleaved pairs, computed in float32) is applied to the video q/k only, as in stock. Grid:
``hidden_states [B, C, F, H, W]``, frames unpatched, rows and columns floor-divided by ``config.patch_size``. No
``_cp_plan`` in diffusers 0.42.1: no context parallelism upstream.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..context import host_memo
from .base import AdapterSpec, SparseProcessorBase, project_heads
from .registry import FAMILIES

__all__ = ["MochiSparseAttnProcessor", "SPEC"]


def _apply_rotary_emb(x, freqs_cos, freqs_sin):
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()

    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)

    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSparseAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for ``MochiAttention`` (diffusers' ``MochiAttnProcessor2_0``, attention call swapped)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = project_heads(attn, hidden_states)
        encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)

        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)

        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        encoder_query, encoder_key, encoder_value = (
            encoder_query.transpose(1, 2),
            encoder_key.transpose(1, 2),
            encoder_value.transpose(1, 2),
        )

        sequence_length = query.size(2)
        encoder_sequence_length = encoder_query.size(2)
        total_length = sequence_length + encoder_sequence_length

        batch_size = query.shape[0]
        valid_indices = host_memo(
            "the valid text tokens of each sample decide the sparse call's shapes", attention_mask, batch_size,
            lambda: _valid_text_indices(attention_mask, batch_size))
        attn_outputs = []
        for idx in range(batch_size):
            valid_prompt_token_indices = valid_indices[idx]

            valid_encoder_query = encoder_query[idx : idx + 1, :, valid_prompt_token_indices, :]
            valid_encoder_key = encoder_key[idx : idx + 1, :, valid_prompt_token_indices, :]
            valid_encoder_value = encoder_value[idx : idx + 1, :, valid_prompt_token_indices, :]

            valid_query = torch.cat([query[idx : idx + 1], valid_encoder_query], dim=2)
            valid_key = torch.cat([key[idx : idx + 1], valid_encoder_key], dim=2)
            valid_value = torch.cat([value[idx : idx + 1], valid_encoder_value], dim=2)

            with self._branch(idx if batch_size > 1 else None):
                attn_output = self._attention(valid_query, valid_key, valid_value,
                                              text_tokens=valid_prompt_token_indices.numel())
            valid_sequence_length = attn_output.size(2)
            attn_output = F.pad(attn_output, (0, 0, 0, total_length - valid_sequence_length))
            attn_outputs.append(attn_output)

        hidden_states = torch.cat(attn_outputs, dim=0)
        hidden_states = hidden_states.transpose(1, 2).flatten(2, 3)

        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (sequence_length, encoder_sequence_length), dim=1
        )

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   text_tokens: int) -> torch.Tensor:
        """The stock per-sample SDPA call on ``[B, H, N, D]``, or sparse attention (text last)."""
        def dense() -> torch.Tensor:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_tokens=text_tokens,
                          dense=lambda: dense().transpose(1, 2))
        return out.transpose(1, 2)

    @contextlib.contextmanager
    def _branch(self, sample: int | None):
        """Per-sample engine state when the samples of one call run separately (``None``: the call's branch)."""
        if sample is None:
            yield
            return
        ctx = self.runtime.context
        branch = ctx.branch
        ctx.branch = (branch, sample)
        try:
            yield
        finally:
            ctx.branch = branch


def _valid_text_indices(attention_mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Per sample, the indices of the nonzero entries of its text mask (what the stock processor gets from
    ``nonzero`` in every call), with one host read (the counts) for the whole batch: a stable sort puts each
    sample's valid positions first, in increasing order."""
    valid = attention_mask.reshape(attention_mask.shape[0], -1) != 0
    counts = valid.sum(-1).tolist()  # the one read (a sync on CUDA)
    order = torch.sort((~valid).to(torch.uint8), dim=-1, stable=True).indices
    return [order[i, :counts[i]] for i in range(batch_size)]


def _grid(module, args, kwargs):
    """``(F, H // p, W // p)``: Mochi patchifies frames one by one (no temporal patch)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None:
        return None
    p = module.config.patch_size
    f, h, w = hs.shape[2:]
    return (f, h // p, w // p)


SPEC = AdapterSpec(
    family=FAMILIES["mochi"],
    processor_classes=("MochiAttnProcessor2_0",),
    processor=MochiSparseAttnProcessor,
    grid_fn=_grid,
    text_position="after",
)
