"""Qwen-Image (``QwenImageTransformer2DModel``): double-stream joint attention with the text FIRST.

Every block's ``attn`` (``QwenDoubleStreamAttnProcessor2_0``) concatenates ``[text, image]`` after separate
projections, norms and RoPE (diffusers' own ``apply_rotary_emb_qwen``); it runs sparse. The grid ``(1, rows, cols)``
comes from the forward's ``img_shapes`` when every sample has exactly one image of the same shape whose token count
is the packed latent's; several images per sample (Qwen-Image-Edit's reference images, layered outputs) give no
grid, so every call runs the stock attention.

Text padding: the processor gets a bool key mask ``[text mask, image ones]``. The pipeline passes None when no
token is padded (batch 1, or equal prompt lengths): sparse as is. A padded batch whose samples all keep the same
valid text prefix ``n`` runs sparse on ``[text[:n], image]`` (the padded keys dropped, which the mask zeroes in
stock), and the padded text query rows run the stock call with the mask; any other mask runs the stock call.
Under context parallelism (Ulysses, ``_cp_plan``) a padded mask runs the stock call too (the shards cannot drop
tokens). The processor is diffusers 0.42's ``QwenDoubleStreamAttnProcessor2_0`` with only the attention call
swapped.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ..context import host_memo, host_read
from .base import AdapterSpec, SparseProcessorBase, project_heads
from .registry import FAMILIES

_MASK_READ = "the valid-text count of the text mask decides the sparse call's shapes"


def valid_text_prefix(mask: torch.Tensor, n_text: int) -> int | None:
    """The common number of leading valid text tokens of a ``[B, 1, 1, text + image]`` bool key mask whose image
    part is all True and whose text part is ``n`` True then False in every sample; None otherwise."""
    if mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    keys = mask[:, 0, 0]
    n = keys[:, :n_text].sum(-1)
    prefix = torch.arange(keys.shape[1], device=keys.device)[None, :] < n[:, None]
    text_prefix = (keys[:, :n_text] == prefix[:, :n_text]).all()
    # the count decides the sparse call's shapes: one host read (a sync on CUDA)
    image_on, same, is_prefix, n0 = torch.stack([keys[:, n_text:].all(), (n == n[0]).all(), text_prefix,
                                                 n[0]]).tolist()
    return int(n0) if image_on and same and is_prefix else None


class QwenImageSparseAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for Qwen-Image's double-stream blocks (text first). Keyword or positional call."""

    def __call__(self, attn, hidden_states: torch.FloatTensor, encoder_hidden_states: torch.FloatTensor = None,
                 encoder_hidden_states_mask: torch.FloatTensor = None,
                 attention_mask: torch.FloatTensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.FloatTensor:
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                             "Pass encoder_hidden_states_mask to let the processor build the joint mask.")
        text_mask = encoder_hidden_states_mask
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones((hidden_states.shape[0], hidden_states.shape[1]), dtype=torch.bool,
                                    device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]
        img_query, img_key, img_value = project_heads(attn, hidden_states)
        txt_query, txt_key, txt_value = project_heads(attn, encoder_hidden_states, added=True)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = self._attention(joint_query, joint_key, joint_value, attention_mask, seq_txt, text_mask)
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output

    def _attention(self, query, key, value, attention_mask, seq_txt: int, text_mask=None) -> torch.Tensor:
        """The stock attention call, or sparse attention on ``[valid text, image]`` (see the module docstring).

        The valid-text count is read on the host once per ``text_mask`` tensor (the forward's
        ``encoder_hidden_states_mask``, which every block gets): the first sparse layer of a forward reads it, the
        others reuse it (:func:`~dit_sparse.integration.context.host_memo`)."""
        if attention_mask is None:
            return self.attend(query, key, value, text_tokens=seq_txt,
                               dense=lambda: self.stock_attention(query, key, value))
        if self._parallel_config is not None:
            n = None
        elif text_mask is None:
            n = host_read(_MASK_READ, lambda: valid_text_prefix(attention_mask, seq_txt))
        else:  # the joint mask is [text_mask, ones]: a function of text_mask and the shapes
            n = host_memo(_MASK_READ, text_mask, (tuple(attention_mask.shape), seq_txt),
                          lambda: valid_text_prefix(attention_mask, seq_txt))
        if n is None:  # a mask that is not one common valid text prefix (or sharded): the stock call
            self.runtime.calls["dense"] += 1
            return self.stock_attention(query, key, value, attention_mask)
        return self.attend_valid_text(query, key, value, attention_mask, text_tokens=seq_txt, valid_text=n,
                                      text_position="before")


def image_grid(module, args, kwargs):
    """``(1, rows, cols)`` from ``img_shapes`` when every sample has one image of the same shape whose token count
    is the packed latent's; None otherwise."""
    shapes = kwargs.get("img_shapes", args[4] if len(args) > 4 else None)
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if shapes is None or hs is None or hs.ndim != 3 or len(shapes) == 0:
        return None
    per_sample = [s if isinstance(s, list) else [s] for s in shapes]  # [(f, h, w)] per sample, or one tuple each
    if any(len(s) != 1 for s in per_sample) or len({tuple(s[0]) for s in per_sample}) != 1:
        return None
    f, h, w = (int(x) for x in per_sample[0][0])
    if f != 1 or f * h * w != hs.shape[1]:
        return None
    return (1, h, w)


SPEC = AdapterSpec(
    family=FAMILIES["qwenimage"],
    processor_classes=("QwenDoubleStreamAttnProcessor2_0",),
    processor=QwenImageSparseAttnProcessor,
    grid_fn=image_grid,
    text_position="before",
)
