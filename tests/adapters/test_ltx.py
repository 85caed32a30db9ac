"""LTX-Video adapter: dense parity, RoPE before the head split, cross-attention untouched, grid from the forward's
num_frames/height/width, video_coords stays dense, batched CFG, pipeline end to end, lifecycle."""

from __future__ import annotations

import torch
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig

DENSE = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
ALL_ON = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch")
SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 round-off of a different summation order (measured max diff ~4e-7)
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
    # ENVIRONMENT.md §6: the framewise paths of the tiny VAE do not work
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


@torch.no_grad()
def test_transformer_dense_config_is_bit_exact():
    tr = ltx_transformer()
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 2}


@torch.no_grad()
def test_transformer_all_on_plan_matches_stock():
    tr = ltx_transformer()
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    out = tr(**transformer_inputs())[0]
    torch.testing.assert_close(out, ref, **TOL)
    assert rt.calls["sparse"] == 2 and rt.context.grid == GRID


@torch.no_grad()
def test_transformer_sparse_differs_and_remove_restores():
    tr = ltx_transformer()
    ref = tr(**transformer_inputs())[0]
    original = dict(tr.attn_processors)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    names = {k: type(v).__name__ for k, v in tr.attn_processors.items()}
    for i in range(2):
        assert names[f"transformer_blocks.{i}.attn1.processor"] == "LTXSparseAttnProcessor"
        # cross-attention keeps the very same stock processor object
        key = f"transformer_blocks.{i}.attn2.processor"
        assert names[key] == "LTXVideoAttnProcessor" and tr.attn_processors[key] is original[key]
    assert [tr.attn_processors[f"transformer_blocks.{i}.attn1.processor"].layer for i in range(2)] == [0, 1]
    out = tr(**transformer_inputs())[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    assert rt.calls == {"sparse": 2, "dense": 0} and rt.density < 1.0
    dit_sparse.remove(tr)
    assert all(tr.attn_processors[k] is v for k, v in original.items())
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert not dit_sparse.is_applied(tr)


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
def test_pipeline_dense_parity_and_sparse_end_to_end():
    pipe = ltx_pipeline()
    ref = run(pipe)
    dit_sparse.apply(pipe, DENSE)
    assert (run(pipe) == ref).all()
    dit_sparse.remove(pipe)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    seen = []
    ctx = rt.context
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append((ctx.branch, ctx.step, ctx.grid, kw["hidden_states"].shape)), with_kwargs=True)
    out = run(pipe)
    assert out.shape == ref.shape and not (out == ref).all()
    # batched CFG: one call per step with batch 2 under "cond_uncond"; grid from num_frames/height/width
    grid, shape = (3, 8, 16), torch.Size([2, 384, 32])
    assert seen == [("cond_uncond", 0, grid, shape), ("cond_uncond", 1, grid, shape)]
    # diffusers resets stateful hooks when the pipeline ends: the runtime keeps a summary of the run
    assert rt.context.step == -1 and rt.last_run["steps"] == 2
    assert rt.last_run["calls"] == {"sparse": 2, "dense": 0} and rt.last_run["density"] < 1.0
    # same seed, second generation: state was reset, output identical
    assert (run(pipe) == out).all()
    dit_sparse.remove(pipe)
    assert (run(pipe) == ref).all()


@torch.no_grad()
def test_pipeline_dense_warmup_steps_run_stock_attention():
    pipe = ltx_pipeline()
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16, backend="torch",
                                dense=DensePolicy(dense_steps=1))
    (rt,) = dit_sparse.apply(pipe, cfg)
    run(pipe, steps=2)
    # 1 layer, one batched call per step: step 0 dense, step 1 sparse
    assert rt.last_run["calls"] == {"sparse": 1, "dense": 1}
