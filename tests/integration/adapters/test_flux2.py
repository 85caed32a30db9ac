"""FLUX.2 adapter: the table entry (generic contract in test_contract.py: text FIRST in double- and single-stream
blocks) and FLUX.2's own cases: 4-axis ids, reference-image tokens, fused single-stream projections, layer order.

The pipeline is the real ``Flux2KleinPipeline`` (Qwen3 text encoder) built tiny: a byte-level Qwen2 tokenizer with
no merges and a chat template, a 3-layer Qwen3 (the pipeline stacks hidden states of layers 0-2), a 1-level
``AutoencoderKLFlux2`` (VAE factor 1, 2x2 latent patchify).
"""

from __future__ import annotations

import pytest
import torch
from harness import SPARSE, AdapterCase
from tiny import generator, qwen_tokenizer, seeded

import dit_sparse
from dit_sparse.integration.apply import attn_processors

ROWS, COLS, TEXT = 12, 16, 10  # non-square grid (catches a row/col swap); text not a multiple of 16
DOUBLE, SINGLE = "transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"


def flux2_transformer(joint_attention_dim=16):
    from diffusers import Flux2Transformer2DModel

    return seeded(Flux2Transformer2DModel, patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_attention_dim,
                  timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def img_ids(rows=ROWS, cols=COLS, t=0):
    """The pipelines' (T, H, W, L) latent ids: T = t, H, W row-major, L = 0."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(rows), torch.arange(cols), torch.arange(1))


def transformer_inputs(ids=None, batch=1, batched_ids=False):
    """Forward kwargs; ``batched_ids``: ids ``[B, N, 4]`` as the pipelines pass them (diffusers' context-parallel
    plan shards only those)."""
    g = generator(1)
    ids = img_ids() if ids is None else ids
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(TEXT))
    hidden_states = torch.randn(batch, ids.shape[0], 4, generator=g)
    if batched_ids:
        ids, txt_ids = ids.expand(batch, -1, -1), txt_ids.expand(batch, -1, -1)
    return dict(hidden_states=hidden_states,
                encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
                timestep=torch.tensor([0.5] * batch), img_ids=ids, txt_ids=txt_ids, return_dict=False)


def flux2_pipeline():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = qwen_tokenizer()
    text_encoder = seeded(Qwen3ForCausalLM, Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True))
    vae = seeded(AutoencoderKLFlux2, block_out_channels=(4,), down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=1, norm_num_groups=1,
                 sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
    # joint_attention_dim = 3 stacked Qwen3 layers x hidden 16
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tok, transformer=flux2_transformer(joint_attention_dim=48),
                              is_distilled=False)


def run(pipe, steps=2, seed=0):
    # VAE factor 1, 2x2 patchify: 24 x 32 px -> 12 x 16 image tokens; CFG (empty negative prompt) as 2 calls
    return pipe(prompt="a red ball", num_inference_steps=steps, guidance_scale=4.0, height=2 * ROWS, width=2 * COLS,
                max_sequence_length=16, text_encoder_out_layers=(0, 1, 2), output_type="np",
                generator=generator(seed)).images


CASES = [AdapterCase(
    id="flux2", transformer=flux2_transformer, inputs=lambda tr: transformer_inputs(), grid=(1, ROWS, COLS),
    sparse=(DOUBLE, SINGLE), pipeline=flux2_pipeline, run=run, preset="flux2:rectified-90", cp="ulysses",
    cp_inputs=lambda tr: transformer_inputs(batched_ids=True),
)]


def test_processor_kinds():
    tr = flux2_transformer()
    dit_sparse.apply(tr, SPARSE)
    names = {k: type(v).__name__ for k, v in attn_processors(tr).items()}
    assert names == {DOUBLE: "Flux2SparseAttnProcessor", SINGLE: "Flux2SparseParallelSelfAttnProcessor"}


@pytest.mark.parametrize("ids", [
    pytest.param(torch.cat([img_ids(), img_ids(t=10)]), id="reference-image-tokens"),
    pytest.param(img_ids() + torch.tensor([0, 2, 0, 0]), id="shifted-rows"),
    pytest.param(img_ids()[torch.randperm(ROWS * COLS, generator=generator(0))], id="not-row-major"),
])
@torch.no_grad()
def test_ids_that_are_not_the_latent_grid_run_stock(ids):
    tr = flux2_transformer()
    ref = tr(**transformer_inputs(ids))[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    out = tr(**transformer_inputs(ids))[0]
    assert rt.context.grid is None and rt.calls == {"sparse": 0, "dense": 2}
    assert torch.equal(out, ref)


def test_layer_order_is_execution_order():
    """Layer indices follow the forward: double-stream blocks, then single-stream, 9 before 10."""
    from diffusers import Flux2Transformer2DModel

    tr = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=11,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                 timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4))
    dit_sparse.apply(tr, SPARSE)
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    names += [f"single_transformer_blocks.{i}.attn.processor" for i in range(11)]
    assert {n: p.layer for n, p in attn_processors(tr).items()} == {n: i for i, n in enumerate(names)}


@torch.no_grad()
def test_pipeline_cfg_branches():
    pipe = flux2_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    branches = []
    orig = rt.engine.build_mask
    rt.engine.build_mask = lambda *a, **k: branches.append(rt.context.branch) or orig(*a, **k)
    run(pipe)
    assert set(branches) == {"cond", "uncond"}
    assert rt.last_run["calls"] == {"sparse": 2 * 2 * 2, "dense": 0}  # steps x branches x layers
