"""CogVideoX 1.0 / 1.5 adapter: dense parity, text-first joint attention, RoPE on/off, patch_size_t=2, fused QKV,
batched CFG, pipelines end to end, lifecycle."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig

DENSE = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
ALL_ON = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch")
SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 round-off of a different summation order (measured max diff ~6e-7)

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

    # ENVIRONMENT.md §6 recipe with 3 blocks instead of 4: spatial factor 4, so 64 x 96 px give a 16 x 24
    # latent (decoding is most of a tiny pipeline's time)
    vae = seeded(AutoencoderKLCogVideoX, in_channels=3, out_channels=3,
                 down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
                 block_out_channels=(8,) * 3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
                 temporal_compression_ratio=4)
    return CogVideoXPipeline(transformer=cog_transformer(variant, num_layers=1), vae=vae, text_encoder=t5_encoder(),
                             tokenizer=t5_tokenizer(), scheduler=CogVideoXDDIMScheduler())


def run(pipe, seed=0, steps=2):
    # 64 x 96 px -> 16 x 24 latent -> 8 x 12 patches; 9 frames -> 3 latent frames (1.5: padded to 4 -> 2 token
    # frames)
    return pipe(prompt="a red ball", negative_prompt="", num_inference_steps=steps, height=64, width=96,
                num_frames=9, guidance_scale=6.0, max_sequence_length=16, output_type="np",
                generator=generator(seed)).frames[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_transformer_dense_config_is_bit_exact(variant):
    tr = cog_transformer(variant)
    ref = tr(**transformer_inputs(tr, variant))[0]
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert torch.equal(tr(**transformer_inputs(tr, variant))[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 2}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_transformer_all_on_plan_matches_stock(variant):
    tr = cog_transformer(variant)
    ref = tr(**transformer_inputs(tr, variant))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    out = tr(**transformer_inputs(tr, variant))[0]
    torch.testing.assert_close(out, ref, **TOL)
    assert rt.calls["sparse"] == 2 and rt.context.grid == VARIANTS[variant][3]


@torch.no_grad()
def test_transformer_sparse_differs_and_remove_restores():
    tr = cog_transformer()
    ref = tr(**transformer_inputs(tr))[0]
    original = dict(tr.attn_processors)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    names = {k: type(v).__name__ for k, v in tr.attn_processors.items()}
    assert names == {f"transformer_blocks.{i}.attn1.processor": "CogVideoXSparseAttnProcessor" for i in range(2)}
    assert [p.layer for p in tr.attn_processors.values()] == [0, 1]
    out = tr(**transformer_inputs(tr))[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    assert rt.calls == {"sparse": 2, "dense": 0} and rt.density < 1.0
    dit_sparse.remove(tr)
    assert all(tr.attn_processors[k] is v for k, v in original.items())
    assert torch.equal(tr(**transformer_inputs(tr))[0], ref)
    assert not dit_sparse.is_applied(tr)


@pytest.mark.parametrize("variant", ["5b", "2b"])
@torch.no_grad()
def test_text_first_rows_stay_dense_video_rows_go_sparse(variant):
    """Text sits FIRST in CogVideoX's joint attention. Text query rows are always dense (ALGORITHMS.md §2.4), so
    with a sparse plan the text half of attn1's output equals stock while the video half differs. Declaring the text
    on the wrong side (text_position "after") would make the first video rows dense and the text rows sparse."""
    tr = cog_transformer(variant, num_layers=1)
    attn = tr.transformer_blocks[0].attn1
    outputs = []
    handle = attn.register_forward_hook(lambda m, a, out: outputs.append(out))
    ref = tr(**transformer_inputs(tr, variant))[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    layouts = []
    orig_layout = rt.layout
    rt.layout = lambda *a: layouts.append(orig_layout(*a)) or layouts[-1]
    out = tr(**transformer_inputs(tr, variant))[0]
    handle.remove()
    (video_ref, text_ref), (video_sp, text_sp) = outputs
    n_text = VARIANTS[variant][2]
    assert text_sp.shape[1] == n_text and video_sp.shape[1] == 3 * 8 * 12
    torch.testing.assert_close(text_sp, text_ref, **TOL)
    assert not torch.allclose(video_sp, video_ref, atol=1e-4) and not torch.allclose(out, ref, atol=1e-4)
    (layout,) = layouts
    assert layout.text_tokens == n_text and layout.text_position == "before"


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


@pytest.mark.parametrize("variant", ["5b", "1.5"])
@torch.no_grad()
def test_pipeline_dense_parity_and_sparse_end_to_end(variant):
    pipe = cog_pipeline(variant)
    ref = run(pipe)
    dit_sparse.apply(pipe, DENSE)
    assert (run(pipe) == ref).all()
    dit_sparse.remove(pipe)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    seen = []
    ctx = rt.context
    pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append((ctx.branch, ctx.step, ctx.grid, kw["hidden_states"].shape[0])),
        with_kwargs=True)
    out = run(pipe)
    assert out.shape == ref.shape and not (out == ref).all()
    # batched CFG: one call per step with batch 2 under "cond_uncond"; the 1.5 grid counts the padded frames
    grid = VARIANTS[variant][3]
    assert seen == [("cond_uncond", 0, grid, 2), ("cond_uncond", 1, grid, 2)]
    # diffusers resets stateful hooks when the pipeline ends: the runtime keeps a summary of the run
    assert rt.context.step == -1 and rt.last_run["steps"] == 2
    assert rt.last_run["calls"] == {"sparse": 2, "dense": 0} and rt.last_run["density"] < 1.0
    # same seed, second generation: state was reset, output identical
    assert (run(pipe) == out).all()
    dit_sparse.remove(pipe)
    assert (run(pipe) == ref).all()


@torch.no_grad()
def test_pipeline_dense_warmup_steps_run_stock_attention():
    pipe = cog_pipeline()
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16, backend="torch",
                                dense=DensePolicy(dense_steps=1))
    (rt,) = dit_sparse.apply(pipe, cfg)
    run(pipe, steps=2)
    # 1 layer, one batched call per step: step 0 dense, step 1 sparse
    assert rt.last_run["calls"] == {"sparse": 1, "dense": 1}
