"""SD3 / SD3.5 adapter: the table entries (generic contract in test_contract.py: parity, text last, lifecycle,
pipeline) and SD3's own cases: dual attention (image-only attn2), the context_pre_only last block, layer order,
the latent grid, batched CFG without a cache context."""

from __future__ import annotations

import torch
from harness import ALL_ON, SPARSE, AdapterCase, record_attend
from tiny import clip_encoder, clip_tokenizer, generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse

ROWS, COLS, TEXT = 16, 24, 10  # patch grid (non-square) and a text length that is not a multiple of 16
#: "sd3": SD3.0 blocks; "sd3.5": RMS qk-norm and a dual-attention first block (image-only attn2)
VARIANTS = {"sd3": {}, "sd3.5": {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}}
ATTN0, ATTN0_2, ATTN1 = (f"transformer_blocks.{n}.processor" for n in ("0.attn", "0.attn2", "1.attn"))


def sd3_transformer(variant="sd3.5", seed=0):
    from diffusers import SD3Transformer2DModel

    return seeded(SD3Transformer2DModel, sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                  attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                  pooled_projection_dim=64, out_channels=4, **VARIANTS[variant], seed=seed)


def sd3_pipeline(variant="sd3.5"):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae = seeded(AutoencoderKL, sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,),
                 layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                 use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(variant), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=clip_encoder(with_projection=True), tokenizer=clip_tokenizer(),
        text_encoder_2=seeded(clip_encoder, with_projection=True, seed=1), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(), tokenizer_3=t5_tokenizer())


def run(pipe, seed=0, steps=2, **kw):
    # VAE factor 1, patch 2: 32x48 px -> 16x24 image tokens; text = 77 CLIP + 16 T5 tokens
    return pipe(prompt="a red ball", negative_prompt="blur", num_inference_steps=steps, height=2 * ROWS,
                width=2 * COLS, guidance_scale=5.0, max_sequence_length=16, output_type="np",
                generator=generator(seed), **kw).images


def transformer_inputs(batch=1):
    g = generator(1)
    return dict(hidden_states=torch.randn(batch, 4, 2 * ROWS, 2 * COLS, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.tensor([500.0] * batch),
                return_dict=False)


def sparse_layers(variant):
    return [ATTN0, ATTN0_2, ATTN1] if variant == "sd3.5" else [ATTN0, ATTN1]


CASES = [AdapterCase(
    id=variant, transformer=lambda v=variant: sd3_transformer(v), inputs=lambda tr: transformer_inputs(batch=2),
    grid=(1, ROWS, COLS), sparse=tuple(sparse_layers(variant)),
    pipeline=(lambda v=variant: sd3_pipeline(v)) if variant == "sd3.5" else None,
    run=(lambda pipe, steps: run(pipe, steps=steps)) if variant == "sd3.5" else None,
    preset="sd3:draft-50" if variant == "sd3.5" else None,
    cp="no-plan",
) for variant in VARIANTS]


@torch.no_grad()
def test_text_last_and_image_only_attn2():
    """The generic text-row check covers the joint calls; attn2 of a dual-attention block is image-only
    self-attention (no text tokens), still sparse."""
    tr = sd3_transformer()
    dit_sparse.apply(tr, SPARSE)
    calls = record_attend(tr)
    tr(**transformer_inputs())
    assert [(c["name"], c["text"]) for c in calls] == [(ATTN0, TEXT), (ATTN0_2, 0), (ATTN1, TEXT)]
    assert not torch.allclose(calls[1]["out"], calls[1]["stock"], atol=1e-3)


def test_layer_order_is_execution_order():
    """Layer indices (DensePolicy.dense_layers) follow the forward: a block's attn before its attn2; the stock
    model shares ONE processor object between attn and attn2 of a block (restored as such: generic remove check)."""
    tr = sd3_transformer()
    assert tr.attn_processors[ATTN0] is tr.attn_processors[ATTN0_2]
    dit_sparse.apply(tr, SPARSE)
    assert {n: p.layer for n, p in tr.attn_processors.items()} == {ATTN0: 0, ATTN0_2: 1, ATTN1: 2}


@torch.no_grad()
def test_context_pre_only_last_block():
    tr = sd3_transformer("sd3")
    assert tr.transformer_blocks[-1].attn.context_pre_only and tr.transformer_blocks[-1].attn.to_add_out is None
    block = tr.transformer_blocks[-1]
    g = generator(2)
    hs, ehs = torch.randn(1, ROWS * COLS, 32, generator=g), torch.randn(1, TEXT, 32, generator=g)
    ref = block.attn(hidden_states=hs, encoder_hidden_states=ehs)
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    rt.context.grid = (1, ROWS, COLS)
    out = block.attn(hidden_states=hs, encoder_hidden_states=ehs)
    assert rt.calls["sparse"] == 1
    for o, r in zip(out, ref):  # the text output is returned un-projected, as in stock
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_latent_grid():
    from dit_sparse.integration.adapters.sd3 import latent_grid

    tr = sd3_transformer()
    assert latent_grid(tr, (), transformer_inputs()) == (1, ROWS, COLS)
    assert latent_grid(tr, (torch.zeros(1, 4, 20, 12),), {}) == (1, 10, 6)
    assert latent_grid(tr, (), {"hidden_states": torch.zeros(1, 10, 4)}) is None


@torch.no_grad()
def test_pipeline_batched_cfg_without_cache_context():
    pipe = sd3_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    calls = record_attend(pipe.transformer)
    out = run(pipe)
    # batched CFG: one call per layer and step, both samples inside it; no cache context, so no branch name
    assert {(c["out"].shape[0], c["tokens"], c["text"]) for c in calls} == {(2, ROWS * COLS + 93, 93),
                                                                           (2, ROWS * COLS, 0)}
    # SD3Transformer2DModel is no CacheMixin: the pipeline cannot reset stateful hooks when it ends, so the run's
    # state stays until the next generation starts (detected by the timestep rising again)
    first = rt.summary()
    assert rt.context.step == 1 and rt.context.branch is None and rt.last_run is None
    assert first["steps"] == 2 and first["calls"] == {"sparse": 6, "dense": 0} and first["density"] < 1.0
    assert (run(pipe) == out).all()  # same seed, second generation: state was reset at its start
    assert first.pop("run") == "current" and rt.last_run == first
