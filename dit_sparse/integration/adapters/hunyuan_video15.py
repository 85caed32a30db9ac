"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream joint attention, text LAST.

Every block is dual-stream: ``transformer_blocks.*.attn`` (``HunyuanVideo15AttnProcessor2_0``) projects the video
``hidden_states`` with ``to_*`` and the text ``encoder_hidden_states`` with ``add_*_proj`` and attends over
``[video, text]``. The token refiner (``context_embedder.token_refiner.*``) keeps its stock ``AttnProcessor2_0``.

The transformer reorders the text of each sample as ``[valid image, valid ByT5, valid MLLM, padding...]`` and passes
the reordered ``[B, text]`` mask; the stock processor pads it with True for the video and builds the pairwise mask
``valid(query) & valid(key)``. So the valid keys of each sample are the video plus a prefix of the text, and padded
text query rows see no key at all. Handled exactly, as in the HunyuanVideo adapter (same ``_attention``):

* every sample has the same valid length ``L``: sparse attention on the first ``L`` tokens (valid queries see
  exactly the valid keys, as in stock), and the padded query rows run the stock call on those rows only;
* per-sample lengths differ (or any other mask): the stock call.

RoPE covers the video part only, as in stock. The processor is diffusers 0.42's ``HunyuanVideo15AttnProcessor2_0``
with only the attention call swapped. No ``_cp_plan`` in diffusers 0.42.1, so context parallelism is not available
for this model (``enable_parallelism`` refuses it upstream).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..context import host_memo
from .base import AdapterSpec, project_heads, project_out_text_last
from .hunyuan_video import MASK_READ, HunyuanVideoSparseAttnProcessor, valid_prefix_length
from .hunyuan_video import _grid as hunyuan_grid
from .registry import FAMILIES

__all__ = ["HunyuanVideo15SparseAttnProcessor", "SPEC"]


def _joint_key_mask(text_mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """The stock processor's key-validity vector ``[B, N]``: True for the video, then the text mask."""
    return F.pad(text_mask, (tokens - text_mask.shape[1], 0), value=True).bool()


class HunyuanVideo15SparseAttnProcessor(HunyuanVideoSparseAttnProcessor):
    """Sparse joint attention for HunyuanVideo 1.5's dual-stream ``Attention`` modules."""

    def _valid_length(self, mask: torch.Tensor | None, batch: int, tokens: int, n_video: int) -> int | None:
        """Common valid prefix of ``[video, text]`` from the ``[B, text]`` mask (cached per mask tensor)."""
        if mask is None or mask.ndim != 2:
            return None
        return host_memo(MASK_READ, mask, (batch, tokens, n_video),
                         lambda: valid_prefix_length(_joint_key_mask(mask, tokens)[:, None, None, :], batch, tokens,
                                                     n_video))

    def stock_attention(self, query, key, value, attn_mask=None):
        """The stock attention call for the LAST ``query.shape[1]`` query rows (all rows: the stock call itself);
        ``attn_mask`` is the ``[B, text]`` mask, expanded here exactly as the stock processor does."""
        batch_size, seq_len = key.shape[0], key.shape[1]
        m = _joint_key_mask(attn_mask, seq_len)
        self_attn_mask_1 = m.view(batch_size, 1, 1, seq_len).repeat(1, 1, seq_len, 1)
        self_attn_mask_2 = self_attn_mask_1.transpose(2, 3)
        mask = (self_attn_mask_1 & self_attn_mask_2).bool()
        if query.shape[1] != seq_len:
            mask = mask[:, :, seq_len - query.shape[1]:]
        return super().stock_attention(query, key, value, mask)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        # 1-2. QKV projections and QK normalization
        query, key, value = project_heads(attn, hidden_states)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = project_heads(attn, encoder_hidden_states, added=True)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention (the stock mask is built from the [B, text] mask inside _stock)
        hidden_states = self._attention(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        return project_out_text_last(attn, hidden_states, encoder_hidden_states)


SPEC = AdapterSpec(
    family=FAMILIES["hunyuanvideo15"],
    processor_classes=("HunyuanVideo15AttnProcessor2_0",),
    processor=HunyuanVideo15SparseAttnProcessor,
    grid_fn=hunyuan_grid,
    text_position="after",
)
