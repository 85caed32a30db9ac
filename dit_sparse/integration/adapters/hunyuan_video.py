"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): joint video + text self-attention, text LAST.

Every ``HunyuanVideoAttnProcessor2_0`` (dual-stream ``transformer_blocks.*.attn`` and single-stream
``single_transformer_blocks.*.attn``, token-replace variants included) is replaced. The token refiner
(``context_embedder.token_refiner.*``) uses ``AttnProcessor2_0`` and keeps it.

In diffusers 0.42 both block kinds call the processor with keywords ``(attn, hidden_states=video,
encoder_hidden_states=text, attention_mask=, image_rotary_emb=)``: dual-stream blocks project text with
``add_*_proj``, single-stream blocks (no ``add_q_proj``) concatenate ``[video, text]`` inside the processor. A call
with ``encoder_hidden_states=None`` gets ``[video, text]`` as one tensor; its text length is the token count minus
the video tokens of the grid. RoPE applies to the video part only, exactly as in the stock processor.

The transformer passes a bool key-padding mask ``[B, 1, 1, N]`` (True = attend): video plus the first
``encoder_attention_mask.sum()`` text tokens are valid. Handled exactly:

* no mask, or all True: sparse attention on the whole sequence;
* every sample's valid keys are the video plus a prefix of the text, of one common length ``L``: sparse
  attention on the first ``L`` tokens (valid queries see exactly the valid keys, as in stock), and the padded
  text query rows run the stock attention with the stock mask, restricted to those rows;
* anything else (other mask shapes or dtypes, per-sample lengths, holes): the stock attention call.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..context import host_memo
from .base import AdapterSpec, SparseProcessorBase, project_heads, project_out_text_last
from .registry import FAMILIES

__all__ = ["HunyuanVideoSparseAttnProcessor", "valid_prefix_length", "SPEC"]


def valid_prefix_length(mask: torch.Tensor | None, batch: int, tokens: int, min_valid: int) -> int | None:
    """The common number of valid leading keys of a bool key-padding mask, or None when it is not such a mask.

    Args:
        mask: None, or the attention mask the processor received.
        batch: batch size of the call.
        tokens: sequence length N (keys).
        min_valid: the leading tokens that must be valid (the video tokens).

    Returns:
        ``tokens`` for no mask or an all-True mask; ``L`` when for every sample the valid keys are exactly the first
        ``L`` (``L >= min_valid``, same ``L`` in every sample); None otherwise (the call must stay dense).
    """
    if mask is None:
        return tokens
    if (mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
            or mask.shape[3] != tokens or mask.shape[0] not in (1, batch)):
        return None
    m = mask[:, 0, 0, :]
    counts = m.sum(-1)
    prefix = torch.arange(tokens, device=m.device)[None, :] < counts[:, None]
    # the count decides the shapes of the sparse call: one host read (a sync on CUDA)
    n, is_prefix, same = torch.stack([counts[0], (m == prefix).all(), (counts == counts[0]).all()]).tolist()
    if not (is_prefix and same) or n < min_valid:
        return None
    return int(n)


#: why the key-padding mask is read on the host (:func:`dit_sparse.integration.context.host_memo`)
MASK_READ = "the valid-text count of the key-padding mask decides the sparse call's shapes"


class HunyuanVideoSparseAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for HunyuanVideo's ``Attention`` modules (dual- and single-stream blocks).

    diffusers' ``HunyuanVideoAttnProcessor2_0`` with only the attention call swapped for :meth:`attend`.
    """

    def _valid_length(self, mask: torch.Tensor | None, batch: int, tokens: int, n_video: int) -> int | None:
        """:func:`valid_prefix_length`, read on the host once per mask tensor
        (:func:`~dit_sparse.integration.context.host_memo`): the transformer builds the mask once per forward, so its
        first sparse layer reads it and every other layer of that forward reuses the count (no sync)."""
        if mask is None:
            return tokens
        return host_memo(MASK_READ, mask, (batch, tokens, n_video),
                         lambda: valid_prefix_length(mask, batch, tokens, n_video))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections, 2. QK normalization
        query, key, value = project_heads(attn, hidden_states)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            if attn.add_q_proj is None and encoder_hidden_states is not None:
                n_text = encoder_hidden_states.shape[1]
                query = torch.cat([apply_rotary_emb(query[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                   query[:, -n_text:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :-n_text], image_rotary_emb, sequence_dim=1),
                                 key[:, -n_text:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention
        hidden_states = self._attention(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        return project_out_text_last(attn, hidden_states, encoder_hidden_states)

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The stock attention call, or sparse attention on the valid ``[video, text prefix]`` (see module doc)."""
        tokens = query.shape[1]
        grid = self.runtime.context.grid
        n_video = None if grid is None else grid[0] * grid[1] * grid[2]
        if n_video is None or tokens < n_video or key.shape[1] != tokens:  # dense (unknown / mismatched grid)
            return self.attend(query, key, value, text_tokens=0,
                               dense=lambda: self.stock_attention(query, key, value, attention_mask))
        valid = self._valid_length(attention_mask, query.shape[0], tokens, n_video)
        if valid is None:  # a mask we cannot express as one common valid prefix: stock attention
            self.runtime.calls["dense"] += 1
            return self.stock_attention(query, key, value, attention_mask)
        return self.attend_valid_text(query, key, value, attention_mask, text_tokens=tokens - n_video,
                                      valid_text=valid - n_video, text_position="after")


def _grid(module, args, kwargs):
    """``(frames, height, width)`` in patch tokens, as the transformer computes it (floor division)."""
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if hs is None:
        return None
    cfg = module.config
    f, h, w = hs.shape[2:]
    return (f // cfg.patch_size_t, h // cfg.patch_size, w // cfg.patch_size)


SPEC = AdapterSpec(
    family=FAMILIES["hunyuanvideo"],
    processor_classes=("HunyuanVideoAttnProcessor2_0",),
    processor=HunyuanVideoSparseAttnProcessor,
    grid_fn=_grid,
    text_position="after",
)
