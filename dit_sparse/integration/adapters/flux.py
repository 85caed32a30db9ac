"""FLUX.1 (``FluxTransformer2DModel``): joint attention with the text FIRST, in both block kinds.

* Double-stream blocks (``transformer_blocks.*.attn``) get image ``hidden_states`` and text
  ``encoder_hidden_states`` separately; the processor concatenates ``[text, image]`` and returns both parts.
* Single-stream blocks (``single_transformer_blocks.*.attn``) get ``[text, image]`` as ONE tensor with
  ``encoder_hidden_states=None``: the text length is the total minus the image tokens of the grid.

Both kinds run sparse; RoPE covers text + image and is applied before the attention call, as in stock. The grid
``(1, rows, cols)`` comes from the forward's ``img_ids`` and is only trusted when those ids are exactly the
row-major grid of the packed latent ``hidden_states [B, N, C]``. Anything else (Kontext's extra reference-image
tokens, shifted ids) gives no grid, so every call runs the stock attention.
The processor is diffusers 0.42's ``FluxAttnProcessor`` with only the attention call swapped.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..context import host_memo
from .base import AdapterSpec, SparseProcessorBase
from .registry import FAMILIES


def joint_qkv_text_first(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                         image_rotary_emb, get_qkv_projections):
    """The stock FLUX / FLUX.2 joint q, k, v: projections, q/k norms, ``[text, image]`` and RoPE, as diffusers does.

    ``get_qkv_projections`` is the model's own ``_get_qkv_projections`` (transformer_flux or transformer_flux2).
    """
    query, key, value, encoder_query, encoder_key, encoder_value = get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query, encoder_key, encoder_value = (
            t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class FluxSparseAttnProcessor(SparseProcessorBase):
    """Sparse joint attention for ``FluxAttention`` (double- and single-stream blocks). Positional call."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = joint_qkv_text_first(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                                 _get_qkv_projections)

        def dense():
            return self.stock_attention(query, key, value, attention_mask)

        text_tokens = self._text_tokens(attn, query, encoder_hidden_states)
        if attention_mask is not None or text_tokens is None:
            hidden_states = dense()
        else:
            hidden_states = self.attend(query, key, value, text_tokens=text_tokens, dense=dense)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    def _text_tokens(self, attn, query: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> int | None:
        """Text tokens at the front of ``query``, or None when this call must stay dense."""
        if encoder_hidden_states is not None:
            # double-stream: the processor itself put the text in front (only with the added projections)
            return encoder_hidden_states.shape[1] if attn.added_kv_proj_dim is not None else None
        grid = self.runtime.context.grid
        if grid is None:
            return 0  # attend() runs it dense (no grid)
        text = query.shape[1] - grid[0] * grid[1] * grid[2]
        # single-stream: [text, image] in one tensor. A negative remainder fails attend()'s token check -> dense.
        return text if text >= 0 else 0


def image_grid(module, args, kwargs):
    """``(1, rows, cols)`` from ``img_ids``, when they are the row-major grid of the packed latent; else None.

    The check reads the ids on the host (a sync): once per ``img_ids`` tensor
    (:func:`~dit_sparse.integration.context.host_memo`;
    a pipeline passes the same tensor at every step, so once per generation), as one read.
    """
    ids = kwargs.get("img_ids")
    hs = kwargs.get("hidden_states", args[0] if args else None)
    if ids is None or hs is None or not torch.is_tensor(ids) or hs.ndim != 3:
        return None
    if ids.ndim == 3:  # deprecated batched ids (the model itself takes [0])
        ids3, ids = ids, ids[0]
    else:
        ids3 = ids
    n = ids.shape[0]
    if ids.ndim != 2 or ids.shape[1] < 3 or n == 0 or n != hs.shape[1]:
        return None
    return host_memo("the grid decides the layout: read from img_ids", ids3, (ids3.ndim, n),
                     lambda: _row_major_grid(ids[:, 1], ids[:, 2]))


def _row_major_grid(rows: torch.Tensor, cols: torch.Tensor) -> tuple[int, int, int] | None:
    """``(1, h, w)`` when the ids ``(rows, cols)`` are integers placing token ``i`` at ``(i // w, i % w)``; else None.
    One host read."""
    n = rows.shape[0]
    r, c = rows.to(torch.int64), cols.to(torch.int64)  # ids may be bf16: compare as integers, not in their dtype
    integral = (rows == r).all() & (cols == c).all()
    lo_r, hi_r, lo_c, hi_c = r.min(), r.max(), c.min(), c.max()
    row_major = (r * (hi_c + 1) + c == torch.arange(n, device=r.device)).all()
    ok, lo_r, hi_r, lo_c, hi_c = torch.stack([integral & row_major, lo_r, hi_r, lo_c, hi_c]).tolist()
    h, w = hi_r + 1, hi_c + 1
    if not ok or lo_r != 0 or lo_c != 0 or h * w != n:
        return None
    return (1, h, w)


SPEC = AdapterSpec(
    family=FAMILIES["flux"],
    processor_classes=("FluxAttnProcessor",),
    processor=FluxSparseAttnProcessor,
    grid_fn=image_grid,
    text_position="before",
    is_sparse_candidate=lambda name: name.endswith(".attn.processor"),
    # FLUX's _cp_plan splits img_ids at the transformer's input, before the grid is read: no rank sees the grid
    context_parallel="the grid comes from img_ids, which diffusers' FLUX plan shards before dit_sparse reads them",
)
