"""CogVideoX 1.0 / 1.5 adapter: the table entries (generic contract in test_contract.py: parity, text first,
lifecycle, pipelines, presets) for RoPE on/off and patch_size_t=2, and CogVideoX's own cases: fused QKV, batched
CFG with the padded-frames grid, dense warm-up."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from harness import ALL_ON, DENSE, SPARSE, TOL, AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse

# variant -> (transformer config, latent frames, text tokens, grid)
#   "5b":  CogVideoX-5B style: RoPE on the video tokens, no patch embedding positions; 10 text tokens (not a
#          multiple of the 16-token block, so the text block is padded)
#   "2b":  CogVideoX-2B style: no RoPE, sin-cos positions in the patch embedding (text must fill
#          max_text_seq_length there, 13 here: again not a block multiple)
#   "1.5": CogVideoX1.5 style: patch_size_t=2 (4 latent frames -> 2 token frames), RoPE of grid_type "slice"
VARIANTS = {
    "5b": (dict(use_rotary_positional_embeddings=True, max_text_seq_length=16), 3, 10, (3, 8, 12)),
    "2b": (dict(use_rotary_positional_embeddings=False, max_text_seq_length=13), 3, 13, (3, 8, 12)),
    "1.5": (dict(use_rotary_positional_embeddings=True, max_text_seq_length=16, patch_size_t=2, sample_width=24,
                 sample_height=16), 4, 10, (2, 8, 12)),
}


def cog_transformer(variant: str = "5b", num_layers: int = 2):
    from diffusers import CogVideoXTransformer3DModel

    kwargs = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=2,
                  text_embed_dim=32, num_layers=num_layers, sample_width=4, sample_height=4, sample_frames=9,
                  patch_size=2, temporal_compression_ratio=4)
    kwargs.update(VARIANTS[variant][0])
    return seeded(CogVideoXTransformer3DModel, **kwargs)


def rotary_emb(transformer, frames: int, height: int, width: int):
    """The pipeline's own RoPE for a latent ``frames x height x width`` (None for models without RoPE)."""
    from diffusers import CogVideoXPipeline

    if not transformer.config.use_rotary_positional_embeddings:
        return None
    fake = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, height * 8, width * 8, frames, "cpu")


def transformer_inputs(transformer, variant: str = "5b"):
    """Batched CFG-like call: batch 2, ``[B, F, C, H, W]`` latents 16 x 24 (non-square: a height/width mix-up
    shows)."""
    _, frames, text, _ = VARIANTS[variant]
    g = generator(1)
    return dict(hidden_states=torch.randn(2, frames, 4, 16, 24, generator=g),
                encoder_hidden_states=torch.randn(2, text, 32, generator=g), timestep=torch.tensor([500, 500]),
                image_rotary_emb=rotary_emb(transformer, frames, 16, 24), return_dict=False)


def cog_pipeline(variant: str = "5b"):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    # docs/testing.md#tiny-models recipe with 3 blocks instead of 4: spatial factor 4, so 64 x 96 px give a 16 x 24
    # latent (decoding is most of a tiny pipeline's time)
    vae = seeded(AutoencoderKLCogVideoX, in_channels=3, out_channels=3,
                 down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                 block_out_channels=(8,) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
                 temporal_compression_ratio=4)
    return CogVideoXPipeline(transformer=cog_transformer(variant, num_layers=1), vae=vae, text_encoder=t5_encoder(),
                             tokenizer=t5_tokenizer(), scheduler=CogVideoXDDIMScheduler())


CASES = [AdapterCase(
    id=f"cogvideox-{variant}", transformer=lambda v=variant: cog_transformer(v),
    inputs=lambda tr, v=variant: transformer_inputs(tr, v), grid=VARIANTS[variant][3],
    sparse=tuple(f"transformer_blocks.{i}.attn1.processor" for i in range(2)),
    pipeline=(lambda v=variant: cog_pipeline(v)) if variant != "2b" else None,
    run=(lambda pipe, steps: run(pipe, steps=steps)) if variant != "2b" else None,
    preset={"5b": "cogvideox-2b:retention", "1.5": "cogvideox:rectified-85"}.get(variant), cp="no-plan",
) for variant in VARIANTS]


def run(pipe, seed=0, steps=2):
    # 64 x 96 px -> 16 x 24 latent -> 8 x 12 patches; 9 frames -> 3 latent frames (1.5: padded to 4 -> 2 token
    # frames)
    return pipe(prompt="a red ball", negative_prompt="", num_inference_steps=steps, height=64, width=96,
                num_frames=9, guidance_scale=6.0, max_sequence_length=16, output_type="np",
                generator=generator(seed)).frames[0]


@torch.no_grad()
def test_fused_qkv_processors_are_served():
    tr = cog_transformer()
    tr.fuse_qkv_projections()
    fused = dict(tr.attn_processors)
    assert {type(p).__name__ for p in fused.values()} == {"FusedCogVideoXAttnProcessor2_0"}
    ref = tr(**transformer_inputs(tr))[0]
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert all(p.fused for p in tr.attn_processors.values())
    assert torch.equal(tr(**transformer_inputs(tr))[0], ref)
    dit_sparse.remove(tr)
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    torch.testing.assert_close(tr(**transformer_inputs(tr))[0], ref, **TOL)
    assert rt.calls["sparse"] == 2
    dit_sparse.remove(tr)
    assert all(tr.attn_processors[k] is v for k, v in fused.items())


@torch.no_grad()
def test_pipeline_batched_cfg_and_padded_frames_grid():
    variant = "1.5"
    pipe = cog_pipeline(variant)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    seen = []
    ctx = rt.context
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append((ctx.branch, ctx.step, ctx.grid, kw["hidden_states"].shape[0])),
        with_kwargs=True)
    run(pipe)
    # batched CFG: one call per step with batch 2 under "cond_uncond"; the 1.5 grid counts the padded frames
    grid = VARIANTS[variant][3]
    assert seen == [("cond_uncond", 0, grid, 2), ("cond_uncond", 1, grid, 2)]
    # diffusers resets stateful hooks when the pipeline ends: the runtime keeps a summary of the run
    assert rt.context.step == -1 and rt.last_run["steps"] == 2
    assert rt.last_run["calls"] == {"sparse": 2, "dense": 0} and rt.last_run["density"] < 1.0
