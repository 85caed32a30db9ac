"""FLUX adapter: the table entry (generic contract in test_contract.py: parity, text first in double- and
single-stream blocks, lifecycle, pipeline) and FLUX's own cases: grid from img_ids (Kontext, shifted, permuted
ids run dense), layer order, true CFG branches."""

from __future__ import annotations

import pytest
import torch
from harness import SPARSE, AdapterCase
from tiny import clip_encoder, clip_tokenizer, generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DraftAttentionConfig, SparseAttentionConfig, TemporalReuseConfig

ROWS, COLS, TEXT = 16, 24, 10  # a non-square grid (catches a row/col swap) and text not a multiple of 16
DOUBLE, SINGLE = "transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"


def flux_transformer(seed=0):
    from diffusers import FluxTransformer2DModel

    return seeded(FluxTransformer2DModel, patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                  axes_dims_rope=[4, 4, 8], seed=seed)


def flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

    vae = seeded(AutoencoderKL, sample_size=32, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
                 norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                 scaling_factor=1.5035)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_encoder(),
                        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder(), tokenizer_2=t5_tokenizer(),
                        transformer=flux_transformer(), image_encoder=None, feature_extractor=None)


def run(pipe, seed=0, steps=2, **kw):
    # VAE factor 1, 2x2 packing: 32x48 px -> 16x24 image tokens
    return pipe(prompt="a red ball", num_inference_steps=steps, height=2 * ROWS, width=2 * COLS, guidance_scale=3.5,
                max_sequence_length=16, output_type="np", generator=generator(seed), **kw).images


def img_ids(rows=ROWS, cols=COLS):
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] += torch.arange(rows)[:, None]
    ids[..., 2] += torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def transformer_inputs(ids=None, batch=1):
    g = generator(1)
    ids = img_ids() if ids is None else ids
    return dict(hidden_states=torch.randn(batch, ids.shape[0], 4, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.tensor([0.5] * batch),
                img_ids=ids, txt_ids=torch.zeros(TEXT, 3), return_dict=False)


CASES = [AdapterCase(
    id="flux", transformer=flux_transformer, inputs=lambda tr: transformer_inputs(batch=2), grid=(1, ROWS, COLS),
    sparse=(DOUBLE, SINGLE), pipeline=flux_pipeline, run=lambda pipe, steps: run(pipe, steps=steps),
    preset="flux:neighborhood", cp="refuses",
)]


@pytest.mark.parametrize("ids", [
    pytest.param(torch.cat([img_ids(), img_ids() + torch.tensor([1.0, 0, 0])]), id="kontext-reference-tokens"),
    pytest.param(img_ids() + torch.tensor([0, 2.0, 0]), id="shifted-rows"),
    pytest.param(img_ids()[torch.randperm(ROWS * COLS, generator=generator(0))], id="not-row-major"),
])
@torch.no_grad()
def test_ids_that_are_not_the_latent_grid_run_dense(ids):
    tr = flux_transformer()
    ref = tr(**transformer_inputs(ids))[0]
    (rt,) = dit_sparse.apply(tr, SPARSE)
    out = tr(**transformer_inputs(ids))[0]
    assert rt.context.grid is None and rt.calls == {"sparse": 0, "dense": 2}
    assert torch.equal(out, ref)


def test_grid_from_img_ids():
    from dit_sparse.integration.adapters.flux import image_grid

    tr = flux_transformer()
    kw = transformer_inputs()
    assert image_grid(tr, (), kw) == (1, ROWS, COLS)
    assert image_grid(tr, (), {**kw, "img_ids": img_ids()[None]}) == (1, ROWS, COLS)  # deprecated 3-D ids
    assert image_grid(tr, (), {**kw, "img_ids": None}) is None
    assert image_grid(tr, (), {**kw, "img_ids": img_ids(COLS, ROWS)}) == (1, COLS, ROWS)


def test_grid_from_bf16_img_ids_and_read_once():
    """The pipelines pass ids in the model dtype: bf16 ids of a 20 x 30 grid (token index 599 is not a bf16 number)
    are still the row-major grid (compared as integers), and one ids tensor is read on the host only once."""
    from dit_sparse.integration.adapters.flux import image_grid
    from dit_sparse.integration.context import host_read
    from tests.sync_guard import no_host_sync

    ids = img_ids(20, 30).to(torch.bfloat16)
    kw = {"hidden_states": torch.zeros(1, 600, 4), "img_ids": ids}
    assert image_grid(None, (), kw) == (1, 20, 30)
    assert image_grid(None, (), {**kw, "img_ids": img_ids(20, 30)[torch.arange(600).roll(1)]}) is None
    with no_host_sync("a second grid read of the same ids", allow=(host_read,)) as rec:
        assert image_grid(None, (), kw) == (1, 20, 30)
    assert rec.allowed == []
    ids.add_(0)  # modified in place: read again
    with no_host_sync(allow=(host_read,)) as rec:
        assert image_grid(None, (), kw) == (1, 20, 30)
    assert len(rec.allowed) == 1


def test_layer_order_is_execution_order():
    """Layer indices (DensePolicy.dense_layers) follow the forward: double-stream blocks, then single, 9 before 10."""
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=11, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8])
    dit_sparse.apply(tr, SPARSE)
    names = [f"transformer_blocks.{i}.attn.processor" for i in range(2)]
    names += [f"single_transformer_blocks.{i}.attn.processor" for i in range(11)]
    assert {n: p.layer for n, p in tr.attn_processors.items()} == {n: i for i, n in enumerate(names)}


@torch.no_grad()
def test_pipeline_true_cfg_branches():
    pipe = flux_pipeline()
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16, backend="torch",
                                reuse=TemporalReuseConfig(refresh_period=2, retention=True))
    ref = run(pipe, steps=3, negative_prompt="blur", true_cfg_scale=2.0)
    (rt,) = dit_sparse.apply(pipe, cfg)
    seen = []
    orig = rt.engine.reuse_cache.get

    def spy(layer, branch=None):
        seen.append((layer, branch))
        return orig(layer, branch)

    rt.engine.reuse_cache.get = spy
    out = run(pipe, steps=3, negative_prompt="blur", true_cfg_scale=2.0)
    assert {b for _, b in seen} == {"cond", "uncond"}
    assert len(seen) == 3 * 2 * 2  # steps x branches x layers
    assert rt.last_run["steps"] == 3 and rt.last_run["calls"]["dense"] == 0
    assert torch.isfinite(torch.from_numpy(out)).all() and not (out == ref).all()
