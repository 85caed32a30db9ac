"""Cosmos adapter: table entries for both cross-attention processor versions (generic contract in
test_contract.py: ``attn1`` sparse, ``attn2`` stock) and Cosmos' own cases.

``CosmosTransformer3DModel`` has no ``AttentionMixin`` (no ``attn_processors`` / ``set_attn_processor``):
``dit_sparse.apply`` walks the attention modules itself (``dit_sparse.integration.apply.attn_processors``).

The pipeline is the real ``Cosmos2TextToImagePipeline``. Its safety checker comes from the ``cosmos_guardrail``
package (model downloads, not installable offline); the pipeline refuses to run without one, so the tiny pipeline
gets a pass-through stand-in: it takes no part in denoising (it checks the prompt and the decoded frames).
"""

from __future__ import annotations

import torch
from harness import SPARSE, AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse.integration.apply import attn_processors

GRID = (3, 8, 8)  # latent frames, rows, cols (patch 1x2x2): 192 video tokens
PROCS = ("transformer_blocks.0.attn1.processor", "transformer_blocks.1.attn1.processor")
CROSS = ("transformer_blocks.0.attn2.processor", "transformer_blocks.1.attn2.processor")


def cosmos_transformer(in_channels=4, img_context=False):
    from diffusers import CosmosTransformer3DModel

    extra = dict(img_context_dim_in=8, img_context_num_tokens=4, img_context_dim_out=32) if img_context else {}
    return seeded(CosmosTransformer3DModel, in_channels=in_channels, out_channels=in_channels, num_attention_heads=2,
                  attention_head_dim=16, num_layers=2, mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4,
                  max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,
                  **extra)


def transformer_inputs(img_context=False):
    g = generator(1)
    text = torch.randn(1, 12, 32, generator=g)
    ehs = (text, torch.randn(1, 4, 8, generator=g)) if img_context else text
    return dict(hidden_states=torch.randn(1, 4, GRID[0], 2 * GRID[1], 2 * GRID[2], generator=g),
                timestep=torch.tensor([0.5]), encoder_hidden_states=ehs, fps=24, return_dict=False)


class PassThroughSafetyChecker:
    """Stand-in for ``cosmos_guardrail.CosmosSafetyChecker`` (not installable offline): passes everything."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def cosmos_pipeline():
    from diffusers import AutoencoderKLWan, Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    vae = seeded(AutoencoderKLWan, base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True])
    return Cosmos2TextToImagePipeline(text_encoder=t5_encoder(), tokenizer=t5_tokenizer(),
                                      transformer=cosmos_transformer(in_channels=16), vae=vae,
                                      scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                      safety_checker=PassThroughSafetyChecker())


def run(pipe, steps=2, seed=0):
    # VAE 8x, patch 2: 128 x 128 px -> one 8 x 8 frame of tokens; CFG runs cond and uncond as two calls
    return pipe(prompt="a red ball", negative_prompt="blur", num_inference_steps=steps, guidance_scale=7.0,
                height=128, width=128, max_sequence_length=16, output_type="np", generator=generator(seed)).images


CASES = [
    AdapterCase(id="cosmos", transformer=cosmos_transformer, inputs=lambda tr: transformer_inputs(), grid=GRID,
                sparse=PROCS, stock=CROSS, pipeline=cosmos_pipeline, run=run, preset="cosmos:draft-75",
                cp="no-plan"),
    # Cosmos 2.5: attn2 uses CosmosAttnProcessor2_5 (text + image context); it stays stock
    AdapterCase(id="cosmos-2.5", transformer=lambda: cosmos_transformer(img_context=True),
                inputs=lambda tr: transformer_inputs(img_context=True), grid=GRID, sparse=PROCS, stock=CROSS,
                cp="no-plan"),
]


def test_both_cross_attention_processor_versions_stay_stock():
    for img_context, cls in ((False, "CosmosAttnProcessor2_0"), (True, "CosmosAttnProcessor2_5")):
        tr = cosmos_transformer(img_context=img_context)
        dit_sparse.apply(tr, SPARSE)
        procs = attn_processors(tr)
        assert [type(procs[n]).__name__ for n in CROSS] == [cls, cls]
        assert [type(procs[n]).__name__ for n in PROCS] == ["CosmosSparseAttnProcessor"] * 2


@torch.no_grad()
def test_pipeline_cfg_calls_counted_as_one_step():
    """The pipeline calls the transformer twice per step (cond, uncond; no cache context): same timestep."""
    pipe = cosmos_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    run(pipe, steps=3)
    # not a CacheMixin transformer: diffusers does not reset the hook at the end, the summary is the run's
    summary = rt.summary()
    assert summary["steps"] == 3 and summary["calls"] == {"sparse": 3 * 2 * 2, "dense": 0}
    assert rt.context.grid == (1, 8, 8)
