"""LTX-2 adapter: table entries for both stock processor classes (generic contract in test_contract.py: only the
video self-attention ``attn1`` goes sparse; text, audio and audio-video paths stay stock) and LTX-2's own cases:
the grid from ``(num_frames, height, width)`` checked against ``video_coords``, masks, the per-head gate.

The pipeline is the real ``LTX2Pipeline`` built tiny: a Gemma3 text encoder from a config (2 layers, hidden 16),
an in-memory Gemma tokenizer, the text connectors, video / audio VAEs and vocoder at toy sizes. 32 x 32 px and 3
frames give a 2 x 16 x 16 latent grid (512 video tokens).
"""

from __future__ import annotations

import pytest
import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import CH, generator, seeded

import dit_sparse
from dit_sparse.integration.apply import attn_processors

GRID = (3, 8, 8)  # latent frames, rows, cols (patch 1): 192 video tokens
STOCK = tuple(f"transformer_blocks.0.{m}.processor"
              for m in ("audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn"))


def ltx2_transformer(num_layers=1, caption_channels=16, **extra):
    from diffusers import LTX2VideoTransformer3DModel

    return seeded(LTX2VideoTransformer3DModel, in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,
                  num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
                  audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
                  audio_cross_attention_dim=8, num_layers=num_layers, caption_channels=caption_channels,
                  rope_double_precision=False, **extra)


def transformer_inputs(tr=None, coords=False, **extra):
    """Forward kwargs; ``coords``: also pass the ``video_coords`` the pipelines pass (the model's default)."""
    g = generator(1)
    f, h, w = GRID
    kw = dict(hidden_states=torch.randn(1, f * h * w, 4, generator=g),
              audio_hidden_states=torch.randn(1, 5, 4, generator=g),
              encoder_hidden_states=torch.randn(1, 10, 16, generator=g),
              audio_encoder_hidden_states=torch.randn(1, 10, 16, generator=g), timestep=torch.tensor([500.0]),
              num_frames=f, height=h, width=w, audio_num_frames=5, fps=24.0, return_dict=False)
    if coords:
        kw["video_coords"] = tr.rope.prepare_video_coords(1, f, h, w, torch.device("cpu"), fps=24.0)
    return {**kw, **extra}


def gemma_tokenizer():
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "\u2581": 4}
    for c in CH:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("\u2581" + c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                          pad_token="<pad>")


def _ltx2_video_vae():
    from diffusers import AutoencoderKLLTX2Video

    vae = AutoencoderKLLTX2Video(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                 decoder_block_out_channels=(8,), layers_per_block=(1,),
                                 decoder_layers_per_block=(1, 1),
                                 spatio_temporal_scaling=(True,), decoder_spatio_temporal_scaling=(True,),
                                 decoder_inject_noise=(False, False), downsample_type=("spatial",),
                                 upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False,
                                 patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False)
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return vae


def ltx2_pipeline():
    from diffusers import AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler, LTX2Pipeline
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = gemma_tokenizer()
    hidden = 16
    text_encoder = seeded(Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         sliding_window=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=len(tok) - 1))
    # connectors: 3 stacked hidden states (2 layers + embeddings) -> caption_channels for video and audio
    connectors = seeded(LTX2TextConnectors, caption_channels=hidden, text_proj_in_factor=3,
                        video_connector_num_attention_heads=4, video_connector_attention_head_dim=4,
                        video_connector_num_layers=1, video_connector_num_learnable_registers=None,
                        audio_connector_num_attention_heads=4, audio_connector_attention_head_dim=4,
                        audio_connector_num_layers=1, audio_connector_num_learnable_registers=None,
                        connector_rope_base_seq_len=32, rope_double_precision=False, rope_type="split")
    audio_vae = seeded(AutoencoderKLLTX2Audio, base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1,
                       attn_resolutions=None, in_channels=2, resolution=32, latent_channels=2, norm_type="pixel",
                       causality_axis="height", dropout=0.0, mid_block_add_attention=False, sample_rate=16000,
                       mel_hop_length=160, is_causal=True, mel_bins=8)
    vocoder = seeded(LTX2Vocoder, in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4],
                     upsample_factors=[2, 2], resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]],
                     leaky_relu_negative_slope=0.1, output_sampling_rate=16000)
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=seeded(_ltx2_video_vae),
                        audio_vae=audio_vae, text_encoder=text_encoder, tokenizer=tok, connectors=connectors,
                        transformer=ltx2_transformer(num_layers=2, caption_channels=hidden, rope_type="split"),
                        vocoder=vocoder)


def run(pipe, steps=2, seed=0):
    # batched CFG (guidance 3); no STG / modality guidance (they add perturbed passes)
    out = pipe(prompt="a red ball", negative_prompt="", num_inference_steps=steps, guidance_scale=3.0, stg_scale=0.0,
               modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0, audio_stg_scale=0.0,
               audio_modality_scale=1.0, audio_guidance_rescale=0.0, spatio_temporal_guidance_blocks=None,
               use_cross_timestep=False, height=32, width=32, num_frames=3, frame_rate=25.0, max_sequence_length=16,
               output_type="np", generator=generator(seed))
    return out.frames[0]


CASES = [
    AdapterCase(id="ltx2", transformer=ltx2_transformer, inputs=lambda tr: transformer_inputs(tr, coords=True),
                grid=GRID, sparse=("transformer_blocks.0.attn1.processor",), stock=STOCK, pipeline=ltx2_pipeline,
                run=run, preset="ltx2:draft-75", cp="refuses"),
    # LTX-2.3: LTX2PerturbedAttnProcessor everywhere, per-head gates on attn1, split RoPE
    AdapterCase(id="ltx2-perturbed-gated", transformer=lambda: ltx2_transformer(
        perturbed_attn=True, gated_attn=True, rope_type="split"), inputs=lambda tr: transformer_inputs(tr),
        grid=GRID, sparse=("transformer_blocks.0.attn1.processor",), stock=STOCK, cp="refuses"),
]


@torch.no_grad()
def test_context_parallelism_enabled_after_apply_is_refused_at_the_call():
    from diffusers import ContextParallelConfig

    tr = ltx2_transformer()
    dit_sparse.apply(tr, SPARSE)
    tr.transformer_blocks[0].attn1.processor._parallel_config = ContextParallelConfig(ulysses_degree=2)
    with pytest.raises(NotImplementedError, match="LTX2VideoTransformer3DModel.*cross-attention RoPE"):
        tr(**transformer_inputs(tr))


@torch.no_grad()
def test_coords_that_are_not_the_default_grid_run_stock():
    """Conditioning pipelines move or prepend tokens: their ``video_coords`` differ from the default grid's."""
    tr = ltx2_transformer()
    kw = transformer_inputs(tr, coords=True)
    kw["video_coords"] = kw["video_coords"].clone()
    kw["video_coords"][:, 0] += 1.0  # shifted in time (e.g. a keyframe placed later)
    ref = tr(**kw)[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**kw)[0], ref)
    assert rt.context.grid is None and rt.calls == {"sparse": 0, "dense": 1}


def test_grid_uses_latent_sizes_and_patch():
    from dit_sparse.integration.adapters.ltx2 import _grid

    tr = ltx2_transformer()
    assert _grid(tr, (), transformer_inputs(tr)) == GRID
    assert _grid(tr, (), transformer_inputs(tr, coords=True)) == GRID
    assert _grid(tr, (), {**transformer_inputs(tr), "num_frames": None}) is None
    tr.rope.patch_size = 2  # ceil division, as prepare_video_coords' arange(0, size, patch)
    assert _grid(tr, (), {**transformer_inputs(tr), "height": 7}) == (3, 4, 4)


@torch.no_grad()
def test_self_attention_mask_runs_stock():
    tr = ltx2_transformer()
    f, h, w = GRID
    n = f * h * w
    mask = torch.ones(1, n, n)
    mask[:, :, : h * w] = 0  # no one sees frame 0 (a video_self_attention_mask)
    kw = transformer_inputs(tr, video_self_attention_mask=mask)
    ref = tr(**kw)[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    assert torch.equal(tr(**transformer_inputs(tr, video_self_attention_mask=mask))[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 0}  # masked calls never reach attend()


@torch.no_grad()
@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
def test_all_on_plan_matches_stock_for_both_rope_types(rope_type):
    tr = ltx2_transformer(rope_type=rope_type)
    ref = tr(**transformer_inputs(tr))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    torch.testing.assert_close(tr(**transformer_inputs(tr))[0], ref, **TOL)
    assert rt.calls == {"sparse": 1, "dense": 0}


def test_only_video_self_attention_is_replaced():
    tr = ltx2_transformer()
    dit_sparse.apply(tr, SPARSE)
    kinds = {k.split(".")[2]: type(v).__name__ for k, v in attn_processors(tr).items()}
    assert kinds == {"attn1": "LTX2SparseAttnProcessor", "audio_attn1": "LTX2AudioVideoAttnProcessor",
                     "attn2": "LTX2AudioVideoAttnProcessor", "audio_attn2": "LTX2AudioVideoAttnProcessor",
                     "audio_to_video_attn": "LTX2AudioVideoAttnProcessor",
                     "video_to_audio_attn": "LTX2AudioVideoAttnProcessor"}
