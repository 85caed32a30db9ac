"""Wan-derived transformers served by Wan's processor: WanVACE, Wan2.2-Animate, SkyReels-V2 (table entries; the
generic contract in test_contract.py) and their own cases: VACE blocks sparse, Animate's face blocks stock,
SkyReels' diffusion-forcing mask stays stock."""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
from harness import ALL_ON, SPARSE, AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse

GRID = (3, 8, 8)  # latent 3 x 16 x 16, patch (1, 2, 2): 192 tokens = 12 blocks of 16
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=16, text_dim=32,
           freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=32)
ATTN1 = tuple(f"blocks.{i}.attn1.processor" for i in range(2))
ATTN2 = tuple(f"blocks.{i}.attn2.processor" for i in range(2))


def _common(g, channels=16, frames=3):
    return dict(hidden_states=torch.randn(1, channels, frames, 16, 16, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 10, 32, generator=g), return_dict=False)


# ---------------------------------------------------------------------------------------------- VACE
def vace_transformer(seed=0):
    from diffusers import WanVACETransformer3DModel

    return seeded(WanVACETransformer3DModel, in_channels=16, vace_layers=[0], vace_in_channels=48, **WAN, seed=seed)


def wan_vae():
    from diffusers import AutoencoderKLWan

    return seeded(AutoencoderKLWan, base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])


def run(pipe, steps=2, seed=0):
    """5 frames of 64 x 96 px -> latent 2 x 8 x 12 -> grid (2, 4, 6), 48 tokens. Prompt embeddings are given
    directly (SkyReels' prompt cleaning needs ftfy, which the test environment does not install)."""
    return pipe(prompt_embeds=torch.randn(1, 16, 32, generator=generator(5)),
                negative_prompt_embeds=torch.randn(1, 16, 32, generator=generator(6)), num_inference_steps=steps,
                height=64, width=96, num_frames=5, guidance_scale=5.0, output_type="np",
                generator=generator(seed)).frames[0]


def vace_pipeline():
    """The real WanVACEPipeline; no control video given, so it conditions on its default (zeros, full mask): the
    control stream has 2 x 16 (reactive, inactive) + 64 (mask) = 96 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    tr = seeded(WanVACETransformer3DModel, in_channels=16, vace_layers=[0], vace_in_channels=96, **WAN)
    return WanVACEPipeline(transformer=tr, vae=wan_vae(), text_encoder=t5_encoder("umt5"), tokenizer=t5_tokenizer(),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def skyreels_pipeline():
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    return SkyReelsV2Pipeline(transformer=skyreels_transformer(), vae=wan_vae(), text_encoder=t5_encoder("umt5"),
                              tokenizer=t5_tokenizer(), scheduler=UniPCMultistepScheduler(
                                  flow_shift=8.0, prediction_type="flow_prediction", use_flow_sigmas=True))


def vace_inputs():
    g = generator(1)
    return dict(_common(g), control_hidden_states=torch.randn(1, 48, 3, 16, 16, generator=g))


# ---------------------------------------------------------------------------------------------- SkyReels-V2
def skyreels_transformer(seed=0, **extra):
    from diffusers import SkyReelsV2Transformer3DModel

    return seeded(SkyReelsV2Transformer3DModel, in_channels=16, **WAN, **extra, seed=seed)


def skyreels_inputs():
    return _common(generator(1))


# ---------------------------------------------------------------------------------------------- Animate
def animate_transformer(seed=0):
    from diffusers import WanAnimateTransformer3DModel

    return seeded(WanAnimateTransformer3DModel, in_channels=36, latent_channels=16, image_dim=16,
                  motion_encoder_size=16, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
                  face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=1,
                  motion_encoder_batch_size=4, **WAN, seed=seed)


def animate_inputs():
    """Reference frame + 2 segment frames (T + 1 = 3), pose latents for the T frames, 5 face frames."""
    g = generator(1)
    return dict(_common(g, channels=36), encoder_hidden_states_image=torch.randn(1, 4, 16, generator=g),
                pose_hidden_states=torch.randn(1, 16, 2, 16, 16, generator=g),
                face_pixel_values=torch.randn(1, 3, 5, 16, 16, generator=g))


def animate_pipeline():
    """The real WanAnimatePipeline with a tiny CLIP vision encoder (32 px, 8 px patches: 17 image tokens)."""
    from diffusers import UniPCMultistepScheduler, WanAnimatePipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    vision = seeded(CLIPVisionModel, CLIPVisionConfig(hidden_size=16, intermediate_size=37, num_attention_heads=2,
                                                      num_hidden_layers=2, image_size=32, patch_size=8))
    return WanAnimatePipeline(
        tokenizer=t5_tokenizer(), text_encoder=t5_encoder("umt5"), vae=wan_vae(), transformer=animate_transformer(),
        scheduler=UniPCMultistepScheduler(flow_shift=5.0, prediction_type="flow_prediction", use_flow_sigmas=True),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=vision)


def animate_run(pipe, steps=2, seed=0):
    """Character image, 5 pose frames and 5 face frames (random pixels, fixed seed) at 64 x 96: one segment of
    2 latent frames + the reference frame, grid (3, 4, 6)."""
    rng = np.random.default_rng(0)

    def img(h, w):
        return PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))

    return pipe(image=img(64, 96), pose_video=[img(64, 96) for _ in range(5)],
                face_video=[img(16, 16) for _ in range(5)],
                prompt_embeds=torch.randn(1, 16, 32, generator=generator(5)), height=64, width=96,
                segment_frame_length=5, num_inference_steps=steps, guidance_scale=1.0, output_type="np",
                generator=generator(seed)).frames[0]


FACE = ("face_adapter.0.processor", "face_adapter.1.processor")

CASES = [
    AdapterCase(id="wan-vace", transformer=vace_transformer, inputs=lambda tr: vace_inputs(), grid=GRID,
                # main blocks, then the VACE block (registration order; the VACE block runs first)
                sparse=(*ATTN1, "vace_blocks.0.attn1.processor"), stock=(*ATTN2, "vace_blocks.0.attn2.processor"),
                pipeline=vace_pipeline, run=run, preset="wan-vace:draft-75", cp="no-plan"),
    AdapterCase(id="wan-animate", transformer=animate_transformer, inputs=lambda tr: animate_inputs(), grid=GRID,
                sparse=ATTN1, stock=(*ATTN2, *FACE), pipeline=animate_pipeline, run=animate_run,
                preset="wan-animate:draft-75", cp="no-plan"),
    AdapterCase(id="skyreels-v2", transformer=skyreels_transformer, inputs=lambda tr: skyreels_inputs(), grid=GRID,
                sparse=ATTN1, stock=ATTN2, pipeline=skyreels_pipeline, run=run, preset="skyreels-v2:draft-75",
                cp="no-plan"),
]


@torch.no_grad()
def test_animate_face_blocks_keep_their_processor_and_run():
    tr = animate_transformer()
    face = {n: tr.attn_processors[n] for n in FACE}
    assert {type(p).__name__ for p in face.values()} == {"WanAnimateFaceBlockAttnProcessor"}
    calls = []
    for i in range(2):
        tr.face_adapter[i].register_forward_hook(lambda m, a, out: calls.append(out.shape))
    (rt,) = dit_sparse.apply(tr, SPARSE)
    tr(**animate_inputs())
    assert all(tr.attn_processors[n] is p for n, p in face.items())
    assert len(calls) == 2 and rt.calls == {"sparse": 2, "dense": 0}


@torch.no_grad()
def test_skyreels_diffusion_forcing_block_causal_mask_runs_stock():
    """``num_frame_per_block > 1``: self-attention gets a block-causal mask; every call runs the stock attention
    with it (bit-exact), none sparse."""
    tr = skyreels_transformer(num_frame_per_block=3)
    ref = tr(**skyreels_inputs())[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    assert torch.equal(tr(**skyreels_inputs())[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 0}  # masked calls never reach attend()
