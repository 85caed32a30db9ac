"""Wan2.1 / Wan2.2 adapter: the table entry (generic contract in test_contract.py) and Wan's own cases: both
experts, double apply, the set_attn_processor path, CFG branches, dense warm-up."""

from __future__ import annotations

import pytest
import torch
from harness import AdapterCase
from tiny import generator, seeded, t5_encoder, t5_tokenizer

import dit_sparse
from dit_sparse import DraftAttentionConfig, SparseAttentionConfig, TemporalReuseConfig

SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")


def wan_transformer(seed=0):
    from diffusers import WanTransformer3DModel

    return seeded(WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                  in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, seed=seed)


def wan_pipeline(two_experts: bool = False):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    vae = seeded(AutoencoderKLWan, base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                 temperal_downsample=[False, True, True])
    kwargs = {}
    if two_experts:
        kwargs = {"transformer_2": wan_transformer(seed=1), "boundary_ratio": 0.5}
    return WanPipeline(transformer=wan_transformer(), vae=vae, text_encoder=t5_encoder("umt5"),
                       tokenizer=t5_tokenizer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), **kwargs)


def run(pipe, seed=0, steps=2):
    return pipe(prompt="a red ball", negative_prompt="blur", num_inference_steps=steps, height=96, width=96,
                num_frames=9, guidance_scale=5.0, max_sequence_length=16, output_type="np",
                generator=generator(seed)).frames[0]


def transformer_inputs():
    g = generator(1)
    return dict(hidden_states=torch.randn(1, 16, 5, 32, 32, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 10, 32, generator=g), return_dict=False)


CASES = [AdapterCase(
    id="wan", transformer=wan_transformer, inputs=lambda tr: transformer_inputs(), grid=(5, 16, 16),
    sparse=("blocks.0.attn1.processor", "blocks.1.attn1.processor"),
    stock=("blocks.0.attn2.processor", "blocks.1.attn2.processor"),  # cross-attention
    pipeline=wan_pipeline, run=lambda pipe, steps: run(pipe, steps=steps), preset="wan2.1-t2v-1.3b:draft-80",
    cp="ulysses",
)]


def test_double_apply_raises_and_names_config():
    tr = wan_transformer()
    dit_sparse.apply(tr, SPARSE)
    with pytest.raises(ValueError, match="already applied.*DraftAttentionConfig"):
        dit_sparse.apply(tr, SPARSE)


def test_set_attn_processor_path():
    tr = wan_transformer()
    with torch.no_grad():
        ref = tr(**transformer_inputs())[0]
        tr.set_attn_processor(dit_sparse.sparse_processors(tr, SPARSE))
        out = tr(**transformer_inputs())[0]
    assert dit_sparse.is_applied(tr) and not torch.allclose(out, ref, atol=1e-4)


@torch.no_grad()
def test_wan22_both_experts_get_processors():
    pipe = wan_pipeline(two_experts=True)
    ref = run(pipe, steps=4)
    runtimes = dit_sparse.apply(pipe, SPARSE)
    assert len(runtimes) == 2
    out = run(pipe, steps=4)
    assert all(rt.last_run["calls"]["sparse"] > 0 for rt in runtimes), [rt.last_run for rt in runtimes]
    assert not (out == ref).all()
    dit_sparse.remove(pipe)
    assert (run(pipe, steps=4) == ref).all()


@torch.no_grad()
def test_cfg_branches_keep_separate_reuse_state():
    pipe = wan_pipeline()
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16, backend="torch",
                                reuse=TemporalReuseConfig(refresh_period=2, retention=True))
    (rt,) = dit_sparse.apply(pipe, cfg)
    seen = []
    orig = rt.engine.reuse_cache.get

    def spy(layer, branch=None):
        seen.append(branch)
        return orig(layer, branch)

    rt.engine.reuse_cache.get = spy
    run(pipe, steps=3)
    assert set(seen) == {"cond", "uncond"}


@torch.no_grad()
def test_a_forward_with_the_pipelines_step_index_reads_nothing_on_the_host():
    """When the cache context gives ``step_index`` (Wan's pipelines do), the context hook takes the step from it and
    never reads the timestep: a whole sparse Wan forward after warm-up makes no host read at all, documented or
    not (Wan's own forward makes none either)."""
    from dit_sparse.integration.context import host_read
    from tests.sync_guard import no_host_sync

    tr = wan_transformer()
    (rt,) = dit_sparse.apply(tr, SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8), block_size=16))
    inputs = transformer_inputs()
    with tr.cache_context("cond", step_index=0, num_inference_steps=4):
        tr(**inputs)
    for step in (1, 2):
        inputs["timestep"] = torch.tensor([500.0 - 100 * step])
        with tr.cache_context("cond", step_index=step, num_inference_steps=4):
            with no_host_sync("a Wan forward with step_index", allow=(host_read,)) as rec:
                tr(**inputs)
        assert rec.allowed == [] and rt.context.step == step
    assert rt.calls["sparse"] == 6
