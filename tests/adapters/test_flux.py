"""FLUX adapter: dense parity, all-on exactness, text-first handling in double- and single-stream blocks,
grid from img_ids, pipeline end to end (guidance-distilled and true CFG), lifecycle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import clip_encoder, clip_tokenizer, generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig, TemporalReuseConfig
from dit_sparse.adapters.base import SparseProcessorBase
from dit_sparse.methods.composite import dense_attention

DENSE = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
ALL_ON = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch")
SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
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


def record_attend(tr):
    """Wrap every dit_sparse processor's attend(): record (name, q, k, v, text_tokens, output) per call."""
    calls = []
    for name, proc in tr.attn_processors.items():
        if isinstance(proc, SparseProcessorBase):
            def attend(q, k, v, *, text_tokens, dense, scale=None, _p=proc, _n=name):
                out = SparseProcessorBase.attend(_p, q, k, v, text_tokens=text_tokens, dense=dense, scale=scale)
                calls.append((_n, q, k, v, text_tokens, out))
                return out
            proc.attend = attend
    return calls


@torch.no_grad()
def test_transformer_dense_config_is_bit_exact():
    tr = flux_transformer()
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert rt.calls == {"sparse": 0, "dense": 2} and rt.context.grid == (1, ROWS, COLS)


@torch.no_grad()
def test_transformer_all_on_plan_matches_stock():
    tr = flux_transformer()
    ref = tr(**transformer_inputs(batch=2))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    out = tr(**transformer_inputs(batch=2))[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32 round-off of a different summation order
    assert rt.calls == {"sparse": 2, "dense": 0}  # the double- and the single-stream block both ran sparse


@torch.no_grad()
def test_transformer_sparse_differs_and_remove_restores():
    tr = flux_transformer()
    ref = tr(**transformer_inputs())[0]
    original = dict(tr.attn_processors)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    names = {k: type(v).__name__ for k, v in tr.attn_processors.items()}
    assert names == {DOUBLE: "FluxSparseAttnProcessor", SINGLE: "FluxSparseAttnProcessor"}
    out = tr(**transformer_inputs())[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    assert rt.calls["sparse"] == 2 and rt.density < 1.0
    dit_sparse.remove(tr)
    assert all(tr.attn_processors[k] is v for k, v in original.items())
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert not dit_sparse.is_applied(tr)


def _text_rows_exact(tr, text_tokens):
    """Run SPARSE, return per call: (name, text_tokens, max |diff| of text rows, max |diff| of image rows) vs dense.

    Text rows (at the model's text positions) read every key, so they must equal dense attention; image rows
    are sparse and must differ. Text counted on the wrong side puts image rows where the text is: they differ.
    """
    calls = record_attend(tr)
    tr(**transformer_inputs())
    res = []
    for name, q, k, v, t, out in calls:
        d = (out - dense_attention(q, k, v)).abs()
        res.append((name, t, float(d[:, :text_tokens].max()), float(d[:, text_tokens:].max())))
    return res


@torch.no_grad()
def test_text_first_in_double_and_single_stream_blocks():
    tr = flux_transformer()
    (rt,) = dit_sparse.apply(tr, SPARSE)
    res = _text_rows_exact(tr, TEXT)
    # the single-stream block sees [text, image] as one tensor: its text length is total - grid tokens
    assert [(n, t) for n, t, _, _ in res] == [(DOUBLE, TEXT), (SINGLE, TEXT)]
    for name, _, text_diff, img_diff in res:
        assert text_diff < 1e-5 and img_diff > 1e-3, (name, text_diff, img_diff)


@torch.no_grad()
def test_text_on_the_wrong_side_is_caught():
    """Negative control for the test above: declaring the text 'after' breaks the text-row exactness."""
    from dit_sparse.adapters.flux import SPEC

    tr = flux_transformer()
    (rt,) = dit_sparse.apply(tr, SPARSE)
    rt.adapter = dataclasses.replace(SPEC, text_position="after")
    res = _text_rows_exact(tr, TEXT)
    assert all(text_diff > 1e-3 for _, _, text_diff, _ in res), res


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
    from dit_sparse.adapters.flux import image_grid

    tr = flux_transformer()
    kw = transformer_inputs()
    assert image_grid(tr, (), kw) == (1, ROWS, COLS)
    assert image_grid(tr, (), {**kw, "img_ids": img_ids()[None]}) == (1, ROWS, COLS)  # deprecated 3-D ids
    assert image_grid(tr, (), {**kw, "img_ids": None}) is None
    assert image_grid(tr, (), {**kw, "img_ids": img_ids(COLS, ROWS)}) == (1, COLS, ROWS)


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
def test_pipeline_dense_parity_and_sparse_end_to_end():
    pipe = flux_pipeline()
    ref = run(pipe)
    (rt,) = dit_sparse.apply(pipe, DENSE)
    assert (run(pipe) == ref).all()
    assert rt.last_run["calls"] == {"sparse": 0, "dense": 4}
    dit_sparse.remove(pipe)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    out = run(pipe)
    assert out.shape == ref.shape and not (out == ref).all()
    # diffusers resets stateful hooks when the pipeline ends: the runtime keeps a summary of the run
    assert rt.context.step == -1 and rt.last_run["steps"] == 2
    assert rt.last_run["calls"] == {"sparse": 4, "dense": 0} and rt.last_run["density"] < 1.0
    assert (run(pipe) == out).all()  # same seed, second generation: state was reset
    dit_sparse.remove(pipe)
    assert (run(pipe) == ref).all()


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
