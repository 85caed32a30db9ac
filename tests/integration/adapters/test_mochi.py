"""Mochi adapter: the table entry (generic contract in test_contract.py) and Mochi's own cases: per-sample valid
text (any mask pattern), per-sample engine state under batched CFG, the asymmetric last block.

The tiny inputs are a batch of 2 with different text masks (9 and 4 valid tokens of 12), like the pipeline's
batched CFG (prompt and empty negative prompt): the stock processor attends per sample over [video, valid text].
"""

from __future__ import annotations

import torch
from harness import ALL_ON, SPARSE, TOL, AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse

GRID = (3, 8, 8)  # frames (not patched), rows, cols (patch 2): 192 video tokens
TEXT = 12


def mochi_transformer(in_channels=4):
    from diffusers import MochiTransformer3DModel

    return seeded(MochiTransformer3DModel, patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  pooled_projection_dim=16, in_channels=in_channels, text_embed_dim=32, time_embed_dim=4,
                  activation_fn="swiglu", max_sequence_length=16)


def transformer_inputs(masks=((1,) * 9 + (0,) * 3, (1,) * 4 + (0,) * 8)):
    b = len(masks)
    g = generator(1)
    return dict(hidden_states=torch.randn(b, 4, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g),
                timestep=torch.tensor([500.0] * b), encoder_hidden_states=torch.randn(b, TEXT, 32, generator=g),
                encoder_attention_mask=torch.tensor(masks, dtype=torch.float32), return_dict=False)


def mochi_pipeline():
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    vae = seeded(AutoencoderKLMochi, latent_channels=12, out_channels=3, encoder_block_out_channels=(32,) * 4,
                 decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5, latents_mean=(0.0,) * 12,
                 latents_std=(1.0,) * 12)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=t5_encoder(),
                         tokenizer=t5_tokenizer(), transformer=mochi_transformer(in_channels=12))


def run(pipe, steps=2, seed=0):
    # VAE: 6x in time, 8x in space; patch 2: 13 frames x 64 x 96 px -> 3 x 4 x 6 = 72 video tokens
    return pipe(prompt="a red ball", negative_prompt="", num_inference_steps=steps, guidance_scale=4.5, height=64,
                width=96, num_frames=13, max_sequence_length=16, output_type="np",
                generator=generator(seed)).frames[0]


PROCS = ("transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor")

CASES = [AdapterCase(
    id="mochi", transformer=mochi_transformer, inputs=lambda tr: transformer_inputs(), grid=GRID, sparse=PROCS,
    sparse_calls=4,  # 2 layers x 2 samples: like stock, one attention call per sample
    pipeline=mochi_pipeline, run=run, preset="mochi:draft-75", cp="no-plan",
)]


def spy(rt):
    """Record (query length, branch) of every sparse engine call."""
    seen = []
    engine = rt.engine
    orig = type(engine).sparse_attention

    class Spy(type(engine)):
        def sparse_attention(self, query, *args, **kwargs):
            seen.append((query.shape[1], kwargs.get("branch")))
            return orig(self, query, *args, **kwargs)

    engine.__class__ = Spy
    return seen


@torch.no_grad()
def test_each_sample_attends_over_its_valid_text_with_its_own_state():
    tr = mochi_transformer()
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    seen = spy(rt)
    torch.testing.assert_close(tr(**transformer_inputs())[0], ref, **TOL)
    n = GRID[0] * GRID[1] * GRID[2]
    # per layer: sample 0 (9 valid text tokens), sample 1 (4); each under its own branch key
    assert seen == [(n + 9, (None, 0)), (n + 4, (None, 1))] * 2
    assert rt.context.branch is None  # restored after each call


@torch.no_grad()
def test_mask_with_holes_is_exact():
    """Stock gathers the valid text with ``nonzero``: holes are fine, the gathered tokens sit after the video."""
    masks = ((1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1),)
    tr = mochi_transformer()
    ref = tr(**transformer_inputs(masks))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    seen = spy(rt)
    torch.testing.assert_close(tr(**transformer_inputs(masks))[0], ref, **TOL)
    assert [s for s, _ in seen] == [GRID[0] * GRID[1] * GRID[2] + 7] * 2
    assert {b for _, b in seen} == {None}  # batch 1: the call's own branch


def test_last_block_is_context_pre_only():
    """The asymmetric last block has no text output projection; both blocks run sparse (covered by the table)."""
    tr = mochi_transformer()
    assert hasattr(tr.transformer_blocks[0].attn1, "to_add_out")
    assert not hasattr(tr.transformer_blocks[1].attn1, "to_add_out")
    assert tr.transformer_blocks[1].attn1.add_q_proj.in_features != tr.transformer_blocks[1].attn1.to_q.in_features


@torch.no_grad()
def test_pipeline_batched_cfg_keeps_per_sample_state():
    pipe = mochi_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    seen = spy(rt)
    run(pipe)
    assert {b for _, b in seen} == {("cond_uncond", 0), ("cond_uncond", 1)}
    assert rt.last_run["calls"] == {"sparse": 2 * 2 * 2, "dense": 0}  # steps x layers x samples
