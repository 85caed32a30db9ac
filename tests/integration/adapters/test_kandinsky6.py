"""Kandinsky 6 adapter: table entries with and without the audio stream (generic contract in test_contract.py:
only the video self-attention goes sparse; text branches, cross-attention, audio and audio-video paths stay stock)
and Kandinsky 6's own cases. Transformer level only: the pipeline needs a Qwen2.5-VL + CLIP text stack and the
Kandinsky 6 video / audio VAEs, for which no tiny offline recipe was written (not attempted in this task).
"""

from __future__ import annotations

import torch
from harness import SPARSE, AdapterCase
from tiny import generator, seeded

import dit_sparse
from dit_sparse.integration.apply import attn_processors

GRID = (3, 8, 8)  # latent frames, rows, cols (patch 1x2x2): 192 video tokens
SPARSE_PROCS = tuple(f"visual_transformer_blocks.{i}.video_dec_block.self_attention.processor" for i in range(2))


def k6_transformer():
    from diffusers import Kandinsky6Transformer3DModel

    return seeded(Kandinsky6Transformer3DModel, in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8,
                  time_dim=16, patch_size=(1, 2, 2), model_dim=32, ff_dim=64, num_text_blocks=1,
                  num_visual_blocks=2, axes_dims=(4, 6, 6), in_audio_dim=4, out_audio_dim=4)


def transformer_inputs(audio=True):
    g = generator(1)
    kw = dict(hidden_states=torch.randn(1, GRID[0], 2 * GRID[1], 2 * GRID[2], 9, generator=g),
              encoder_hidden_states=torch.randn(1, 10, 16, generator=g),
              pooled_projections=torch.randn(1, 8, generator=g),
              timestep=torch.tensor([500.0]), return_dict=False)
    if audio:
        kw["audio_hidden_states"] = torch.randn(1, 12, 4, generator=g)
    return kw


CASES = [
    AdapterCase(id="kandinsky6", transformer=k6_transformer, inputs=lambda tr: transformer_inputs(), grid=GRID,
                sparse=SPARSE_PROCS, cp="no-plan",
                stock=("visual_transformer_blocks.0.video_dec_block.cross_attention.processor",
                       "visual_transformer_blocks.0.audio_dec_block.self_attention.processor",
                       "visual_transformer_blocks.0.va_cross_attention.processor",
                       "visual_transformer_blocks.0.av_cross_attention.processor",
                       "video_text_transformer_blocks.0.attn.processor")),
    AdapterCase(id="kandinsky6-video-only", transformer=k6_transformer,
                inputs=lambda tr: transformer_inputs(audio=False), grid=GRID, sparse=SPARSE_PROCS, cp="no-plan"),
]


def test_one_processor_class_only_video_self_attention_replaced():
    tr = k6_transformer()
    before = {k: type(v).__name__ for k, v in attn_processors(tr).items()}
    assert set(before.values()) == {"Kandinsky6AttnProcessor"}
    dit_sparse.apply(tr, SPARSE)
    after = {k: type(v).__name__ for k, v in attn_processors(tr).items()}
    assert [k for k, v in after.items() if v == "Kandinsky6SparseAttnProcessor"] == list(SPARSE_PROCS)


@torch.no_grad()
def test_shifted_rope_positions_keep_the_grid():
    """The image-to-video pipeline appends a reference frame reusing temporal position 0: same token grid."""
    tr = k6_transformer()
    pos = (torch.tensor([0, 1, 0]), torch.arange(GRID[1]), torch.arange(GRID[2]))
    ref = tr(**transformer_inputs(), visual_rope_pos=pos)[0]
    (rt,) = dit_sparse.apply(tr, dit_sparse.SparseAttentionConfig(
        draft=dit_sparse.DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch"))
    torch.testing.assert_close(tr(**transformer_inputs(), visual_rope_pos=pos)[0], ref, rtol=1e-5, atol=1e-5)
    assert rt.context.grid == GRID and rt.calls == {"sparse": 2, "dense": 0}
