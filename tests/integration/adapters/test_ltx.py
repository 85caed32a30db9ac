"""LTX-Video adapter: the table entry (generic contract in test_contract.py: parity, cross-attention stock,
lifecycle, pipeline, Ulysses) and LTX's own cases: grid from positional num_frames/height/width, video_coords stays
dense, batched CFG, dense warm-up."""

from __future__ import annotations

import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse

GRID = (3, 8, 12)  # non-square: a height/width mix-up shows


def ltx_transformer(num_layers: int = 2):
    from diffusers import LTXVideoTransformer3DModel

    return seeded(LTXVideoTransformer3DModel, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                  num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32, num_layers=num_layers,
                  caption_channels=32)


def ltx_pipeline():
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline

    scaling = (True, True, False, False)
    vae = seeded(AutoencoderKLLTXVideo, in_channels=3, out_channels=3, latent_channels=8,
                 block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                 spatio_temporal_scaling=scaling, decoder_spatio_temporal_scaling=scaling,
                 layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, decoder_inject_noise=(False,) * 5,
                 upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1,
                 encoder_causal=True, decoder_causal=False)
    # docs/testing.md#tiny-models: the framewise paths of the tiny VAE do not work
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    return LTXPipeline(transformer=ltx_transformer(num_layers=1), vae=vae, text_encoder=t5_encoder(),
                       tokenizer=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler())


def run(pipe, seed=0, steps=2):
    # spatial compression 4: 32 x 64 px (LTX wants multiples of 32) -> 8 x 16 latent; 9 frames -> 3 latent frames:
    # grid (3, 8, 16), 384 tokens
    return pipe(prompt="a red ball", negative_prompt="", num_inference_steps=steps, height=32, width=64,
                num_frames=9, guidance_scale=3.0, max_sequence_length=16, output_type="np",
                generator=generator(seed)).frames[0]


def transformer_inputs(**over):
    """Batched CFG-like call: batch 2, packed latents ``[B, N, C]``; the second prompt is padded (cross-attention
    mask with zeros, handled by the stock attn2)."""
    g = generator(1)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0
    kw = dict(hidden_states=torch.randn(2, GRID[0] * GRID[1] * GRID[2], 8, generator=g),
              encoder_hidden_states=torch.randn(2, 10, 32, generator=g), timestep=torch.tensor([500, 500]),
              encoder_attention_mask=mask, num_frames=GRID[0], height=GRID[1], width=GRID[2], return_dict=False)
    kw.update(over)
    return kw


CASES = [AdapterCase(
    id="ltx", transformer=ltx_transformer, inputs=lambda tr: transformer_inputs(), grid=GRID,
    sparse=("transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor"),
    stock=("transformer_blocks.0.attn2.processor", "transformer_blocks.1.attn2.processor"),  # cross-attention
    pipeline=ltx_pipeline, run=lambda pipe, steps: run(pipe, steps=steps), preset="ltx:draft-75", cp="ulysses",
    # diffusers 0.42.1's own Ulysses attention fails on LTX's per-head [B, H, 1, T] cross-attention mask in the
    # stock attn2 (it shards q/k/v by head but not the mask), with or without dit_sparse
    cp_inputs=lambda tr: transformer_inputs(encoder_attention_mask=None),
)]


@torch.no_grad()
def test_grid_from_positional_forward_arguments():
    tr = ltx_transformer(num_layers=1)
    kw = transformer_inputs()
    ref = tr(**kw)[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    names = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "num_frames", "height",
             "width")
    args = [kw.pop(n) for n in names]
    out = tr(*args, **kw)[0]
    torch.testing.assert_close(out, ref, **TOL)
    assert rt.context.grid == GRID and rt.calls == {"sparse": 1, "dense": 0}


@torch.no_grad()
def test_video_coords_input_stays_dense_and_exact():
    """RoPE positions from ``video_coords`` (LTXConditionPipeline; conditioning tokens may be prepended): the token
    order is not known to be the grid, so every call runs stock, even when num_frames/height/width are passed too
    (LTXI2VLongMultiPromptPipeline passes 1, 1, 1 with them)."""
    tr = ltx_transformer()
    f, h, w = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in GRID), indexing="ij")
    coords = torch.stack([f.flatten() * 8, h.flatten() * 32, w.flatten() * 32])[None].repeat(2, 1, 1)
    for kw in (dict(num_frames=None, height=None, width=None, video_coords=coords), dict(video_coords=coords)):
        ref = tr(**transformer_inputs(**kw))[0]
        (rt,) = dit_sparse.apply(tr, SPARSE)
        assert torch.equal(tr(**transformer_inputs(**kw))[0], ref)
        assert rt.context.grid is None and rt.calls == {"sparse": 0, "dense": 2}
        if "num_frames" in kw:
            dit_sparse.remove(tr)
    # the same positions given as num_frames/height/width run sparse
    tr(**transformer_inputs())
    assert rt.context.grid == GRID and rt.calls["sparse"] == 2


@torch.no_grad()
def test_pipeline_batched_cfg_and_grid():
    pipe = ltx_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    seen = []
    ctx = rt.context
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append((ctx.branch, ctx.step, ctx.grid, kw["hidden_states"].shape)), with_kwargs=True)
    run(pipe)
    # batched CFG: one call per step with batch 2 under "cond_uncond"; grid from num_frames/height/width
    grid, shape = (3, 8, 16), torch.Size([2, 384, 32])
    assert seen == [("cond_uncond", 0, grid, shape), ("cond_uncond", 1, grid, shape)]
    # diffusers resets stateful hooks when the pipeline ends: the runtime keeps a summary of the run
    assert rt.context.step == -1 and rt.last_run["steps"] == 2
    assert rt.last_run["calls"] == {"sparse": 2, "dense": 0} and rt.last_run["density"] < 1.0
