"""SD3 / SD3.5 adapter: dense parity, all-on exactness, text-last handling, dual attention (attn2), the
context_pre_only last block, pipeline end to end with batched CFG, lifecycle."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import clip_encoder, clip_tokenizer, generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig
from dit_sparse.adapters.base import SparseProcessorBase
from dit_sparse.methods.composite import dense_attention

DENSE = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
ALL_ON = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch")
SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
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


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_transformer_dense_config_is_bit_exact(variant):
    tr = sd3_transformer(variant)
    ref = tr(**transformer_inputs())[0]
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert rt.calls == {"sparse": 0, "dense": len(sparse_layers(variant))} and rt.context.grid == (1, ROWS, COLS)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_transformer_all_on_plan_matches_stock(variant):
    tr = sd3_transformer(variant)
    ref = tr(**transformer_inputs(batch=2))[0]
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    out = tr(**transformer_inputs(batch=2))[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32 round-off of a different summation order
    assert rt.calls == {"sparse": len(sparse_layers(variant)), "dense": 0}


@torch.no_grad()
def test_transformer_sparse_differs_and_remove_restores():
    tr = sd3_transformer()
    ref = tr(**transformer_inputs())[0]
    original = dict(tr.attn_processors)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    names = {k: type(v).__name__ for k, v in tr.attn_processors.items()}
    assert names == dict.fromkeys(sparse_layers("sd3.5"), "SD3SparseJointAttnProcessor")
    assert sorted(p.layer for p in tr.attn_processors.values()) == [0, 1, 2]
    out = tr(**transformer_inputs())[0]
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    assert rt.calls == {"sparse": 3, "dense": 0} and rt.density < 1.0
    dit_sparse.remove(tr)
    # stock SD3 shares ONE processor object between attn and attn2 of a block: the same object is restored
    assert all(tr.attn_processors[k] is v for k, v in original.items())
    assert tr.attn_processors[ATTN0] is tr.attn_processors[ATTN0_2]
    assert torch.equal(tr(**transformer_inputs())[0], ref)
    assert not dit_sparse.is_applied(tr)


def test_layer_order_is_execution_order():
    """Layer indices (DensePolicy.dense_layers) follow the forward: a block's attn before its attn2."""
    tr = sd3_transformer()
    dit_sparse.apply(tr, SPARSE)
    assert {n: p.layer for n, p in tr.attn_processors.items()} == {ATTN0: 0, ATTN0_2: 1, ATTN1: 2}


def _row_diffs(tr):
    """Run SPARSE; per call: (name, text_tokens, max |diff| of the LAST text_tokens rows, of the image rows).

    Text query rows read every key, so they equal dense attention; image rows are sparse and differ. Text
    counted on the wrong side puts image rows where the text is, so those rows differ too.
    """
    calls = record_attend(tr)
    tr(**transformer_inputs())
    res = []
    for name, q, k, v, t, out in calls:
        d = (out - dense_attention(q, k, v)).abs()
        n_img = q.shape[1] - t
        res.append((name, t, float(d[:, n_img:].max()) if t else 0.0, float(d[:, :n_img].max())))
    return res


@torch.no_grad()
def test_text_last_and_image_only_attn2():
    tr = sd3_transformer()
    dit_sparse.apply(tr, SPARSE)
    res = _row_diffs(tr)
    # attn2 of a dual-attention block is image-only self-attention: no text tokens
    assert [(n, t) for n, t, _, _ in res] == [(ATTN0, TEXT), (ATTN0_2, 0), (ATTN1, TEXT)]
    for name, _, text_diff, img_diff in res:
        assert text_diff < 1e-5 and img_diff > 1e-3, (name, text_diff, img_diff)


@torch.no_grad()
def test_text_on_the_wrong_side_is_caught():
    """Negative control for the test above: declaring the text 'before' breaks the text-row exactness."""
    from dit_sparse.adapters.sd3 import SPEC

    tr = sd3_transformer()
    (rt,) = dit_sparse.apply(tr, SPARSE)
    rt.adapter = dataclasses.replace(SPEC, text_position="before")
    res = _row_diffs(tr)
    assert all(text_diff > 1e-3 for _, t, text_diff, _ in res if t), res


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
    from dit_sparse.adapters.sd3 import latent_grid

    tr = sd3_transformer()
    assert latent_grid(tr, (), transformer_inputs()) == (1, ROWS, COLS)
    assert latent_grid(tr, (torch.zeros(1, 4, 20, 12),), {}) == (1, 10, 6)
    assert latent_grid(tr, (), {"hidden_states": torch.zeros(1, 10, 4)}) is None


@torch.no_grad()
def test_pipeline_dense_parity_and_sparse_end_to_end():
    pipe = sd3_pipeline()
    ref = run(pipe)
    (rt,) = dit_sparse.apply(pipe, DENSE)
    assert (run(pipe) == ref).all()
    dit_sparse.remove(pipe)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    calls = record_attend(pipe.transformer)
    out = run(pipe)
    assert out.shape == ref.shape and not (out == ref).all()
    # batched CFG: one call per layer and step, both samples inside it; no cache context, so no branch name
    assert {(q.shape[0], q.shape[1], t) for _, q, _, _, t, _ in calls} == {(2, ROWS * COLS + 93, 93),
                                                                           (2, ROWS * COLS, 0)}
    # SD3Transformer2DModel is no CacheMixin: the pipeline cannot reset stateful hooks when it ends, so the run's
    # state stays until the next generation starts (detected by the timestep rising again)
    first = rt.summary()
    assert rt.context.step == 1 and rt.context.branch is None and rt.last_run is None
    assert first["steps"] == 2 and first["calls"] == {"sparse": 6, "dense": 0} and first["density"] < 1.0
    assert (run(pipe) == out).all()  # same seed, second generation: state was reset at its start
    assert first.pop("run") == "current" and rt.last_run == first
    dit_sparse.remove(pipe)
    assert (run(pipe) == ref).all()
