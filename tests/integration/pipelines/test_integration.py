"""Presets, load_pipeline through from_pretrained on a local folder, composition with diffusers cache hooks,
set_attention_backend and torch.compile, and the integration errors."""

from __future__ import annotations

import pytest
import torch
from test_wan import SPARSE, run, transformer_inputs, wan_pipeline, wan_transformer

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig
from dit_sparse.integration.adapters.registry import FAMILIES
from dit_sparse.integration.pipelines.presets import PRESETS


def test_presets_listed_and_valid():
    presets = dit_sparse.list_presets()
    names = [p.name for p in presets]
    assert "wan2.1-t2v-1.3b:draft-80" in names and "hunyuanvideo:rectified-90" in names
    assert "flux:neighborhood" in names
    assert {p.family for p in presets} == set(FAMILIES)
    for p in presets:
        assert isinstance(p.config, SparseAttentionConfig) and p.description
    assert [p.name for p in dit_sparse.list_presets("flux")] == [n for n in PRESETS if n.startswith("flux:")]
    with pytest.raises(ValueError, match="Available presets"):
        dit_sparse.get_preset("wan:magic-99")


def test_preset_for_another_family_is_refused():
    with pytest.raises(ValueError, match="is for HunyuanVideoTransformer3DModel"):
        dit_sparse.apply(wan_transformer(), "hunyuanvideo:rectified-90")


@torch.no_grad()
def test_load_pipeline_from_local_folder(tmp_path):
    pipe = wan_pipeline()
    ref = run(pipe)
    pipe.save_pretrained(tmp_path / "tiny-wan")
    loaded = dit_sparse.load_pipeline(str(tmp_path / "tiny-wan"), preset="wan2.1-t2v-1.3b:draft-80",
                                      torch_dtype=torch.float32, device="cpu", local_files_only=True)
    assert dit_sparse.is_applied(loaded)
    runtime = dit_sparse.get_runtime(loaded.transformer)
    assert runtime.config == dit_sparse.get_preset("wan2.1-t2v-1.3b:draft-80").config
    out = run(loaded)
    assert out.shape == ref.shape and torch.isfinite(torch.as_tensor(out)).all()
    stock = dit_sparse.load_pipeline(str(tmp_path / "tiny-wan"), local_files_only=True)
    assert not dit_sparse.is_applied(stock)
    assert abs(run(stock) - ref).max() < 1e-5  # save/load round trip


def test_load_pipeline_needs_a_model():
    with pytest.raises(ValueError, match="needs a model id"):
        dit_sparse.load_pipeline()


def test_unsupported_model_lists_supported_classes_and_points_to_the_recipe():
    from pathlib import Path

    from dit_sparse.integration.adapters.registry import supported_transformers

    with pytest.raises(ValueError, match="no adapter for Linear") as e:
        dit_sparse.apply(torch.nn.Linear(2, 2), SPARSE)
    msg = str(e.value)
    assert all(name in msg for name in supported_transformers())  # every supported transformer is named
    assert "'Adding a model' of ARCHITECTURE.md" in msg
    # the section it points to exists
    arch = (Path(__file__).resolve().parents[3] / "ARCHITECTURE.md").read_text()
    assert "\n## Adding a model\n" in arch
    with pytest.raises(ValueError, match="pipeline with a .transformer"):
        dit_sparse.apply(object(), SPARSE)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["first_block", "taylorseer", "pab"])
def test_runs_together_with_diffusers_cache_hooks(cache):
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    pipe = wan_pipeline()
    config = {"first_block": FirstBlockCacheConfig(threshold=0.2),
              "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
              "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                     spatial_attention_timestep_skip_range=(-1, 1001),
                                                     current_timestep_callback=lambda: pipe.current_timestep)}[cache]
    pipe.transformer.enable_cache(config)
    cached = run(pipe, steps=3)
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    both = run(pipe, steps=3)
    assert both.shape == cached.shape and not (both == cached).all()
    assert rt.last_run["calls"]["sparse"] > 0
    dit_sparse.remove(pipe)
    assert (run(pipe, steps=3) == cached).all()  # the cache hook survived apply/remove


@torch.no_grad()
def test_set_attention_backend_reaches_dense_calls():
    tr = wan_transformer()
    tr.set_attention_backend("native")
    ref = tr(**transformer_inputs())[0]
    dit_sparse.apply(tr, SparseAttentionConfig(dense=DensePolicy(force_dense=True)))
    assert all(getattr(p, "_attention_backend", "native") is not None for p in tr.attn_processors.values())
    assert torch.equal(tr(**transformer_inputs())[0], ref)


@torch.no_grad()
def test_torch_compile_with_our_processors():
    tr = wan_transformer()
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
    (rt,) = dit_sparse.apply(tr, cfg)
    eager = tr(**transformer_inputs())[0]
    rt.reset()
    compiled = torch.compile(tr)
    out = compiled(**transformer_inputs())[0]
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_layer_indices_follow_forward_order():
    """dense_layers index blocks in forward order: double-stream 0..n-1, then single-stream, block 10 after 9."""
    from diffusers import HunyuanVideoTransformer3DModel

    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                        num_layers=2, num_single_layers=11, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    dit_sparse.apply(tr, SPARSE)
    layers = {p.name: p.layer for p in tr.attn_processors.values() if hasattr(p, "layer")}
    assert layers["transformer_blocks.0.attn.processor"] == 0
    assert layers["transformer_blocks.1.attn.processor"] == 1
    assert layers["single_transformer_blocks.0.attn.processor"] == 2
    assert layers["single_transformer_blocks.10.attn.processor"] == 12
