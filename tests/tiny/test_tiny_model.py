"""The embedded tiny Wan model: synthetic data, offline loading of the shipped folder, recognisable samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dit_sparse.tiny import model as tm
from dit_sparse.tiny import synthetic as syn

# ------------------------------------------------------------------------------------------------ synthetic data


def test_prompt_round_trip_covers_vocabulary():
    prompts = syn.all_prompts()
    assert len(prompts) == len(set(prompts)) == 75
    for p in prompts:
        assert syn.prompt_of(syn.parse_prompt(p)) == p
    assert syn.parse_prompt("A Yellow TRIANGLE bounces!").motion == "bouncing"
    for bad in ("a red circle", "a circle moving left", "a red blue circle moving left"):
        with pytest.raises(ValueError):
            syn.parse_prompt(bad)


def test_make_clip_is_deterministic_and_in_range():
    spec = syn.random_spec(np.random.default_rng(3))
    a = syn.make_clip(spec, 17, 64, 64)
    b = syn.make_clip(syn.random_spec(np.random.default_rng(3)), 17, 64, 64)
    assert a.shape == (17, 64, 64, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert syn.make_batch([spec], 9, 32, 48).shape == (1, 3, 9, 32, 48)


def test_describe_clip_reads_ground_truth():
    rng = np.random.default_rng(0)
    for _ in range(40):
        spec = syn.random_spec(rng)
        m = syn.matches_prompt(syn.make_clip(spec, 17, 64, 64), syn.prompt_of(spec))
        assert m["colour"] and m["shape"] and m["motion"], (syn.prompt_of(spec), m["described"])


# --------------------------------------------------------------------------------------------- shipped weights


def test_shipped_folder_is_small_and_complete():
    assert (tm.ASSET_DIR / "model_index.json").is_file()
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tm.ASSET_DIR / sub).is_dir(), sub
    assert not list(tm.ASSET_DIR.rglob("*.bin")), "weights must be safetensors"
    size = tm.folder_size()
    assert size < 10 * 1024 * 1024, f"shipped folder is {size / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def pipe():
    return tm.build_pipeline()


def test_loads_offline_through_from_pretrained(pipe):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    assert isinstance(pipe, WanPipeline)
    assert isinstance(pipe.transformer, WanTransformer3DModel) and isinstance(pipe.vae, AutoencoderKLWan)
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name)
        assert not module.training, name
        assert next(module.parameters()).dtype == torch.float32
    cfg = pipe.transformer.config
    assert tuple(cfg.patch_size) == tuple(tm.TRANSFORMER_CONFIG["patch_size"])
    assert cfg.num_layers == tm.TRANSFORMER_CONFIG["num_layers"]
    # the trained VAE carries measured latent statistics, not the placeholders
    assert pipe.vae.config.latents_std != [1.0] * pipe.vae.config.z_dim
    # word-level tokenizer: one token per vocabulary word (+ eos)
    assert len(pipe.tokenizer("a red circle moving right").input_ids) == 6


def test_default_prompt_renders_recognisably(pipe):
    prompt = tm.DEFAULT_PROMPTS[0]  # a red circle moving right
    call = {**tm.DEFAULT_CALL, "num_inference_steps": 10}
    video = pipe(prompt, negative_prompt=tm.DEFAULT_NEGATIVE_PROMPT, generator=torch.Generator().manual_seed(0),
                 **call).frames[0]
    assert video.shape == (17, 64, 64, 3)
    assert np.isfinite(video).all() and video.min() >= 0.0 and video.max() <= 1.0
    spec = syn.parse_prompt(prompt)
    d = syn.describe_clip(video)
    assert d["visible_frames"] == 17, d
    assert d["colour"] == spec.colour and d["shape"] == spec.shape, d
    assert d["motion"] == spec.motion, d
    # the object travels a clear distance in the prompted direction (right: +x), staying at about the same height
    assert d["dx"] > 0.25 and abs(d["dy"]) < 0.1, d
    # one compact object, not a smear over the frame
    assert 0.01 < d["fg_fraction"] < 0.15, d


@pytest.mark.parametrize("prompt", ["a blue square moving left", "a yellow triangle moving down",
                                    "a green circle moving up", "a white square bouncing"])
def test_colour_and_motion_follow_the_prompt(pipe, prompt):
    """Same seed for every prompt: colour and direction come from the text (all five motions covered)."""
    call = {**tm.DEFAULT_CALL, "num_inference_steps": 8}
    video = pipe(prompt, negative_prompt="", generator=torch.Generator().manual_seed(1), **call).frames[0]
    m = syn.matches_prompt(video, prompt)
    assert m["colour"] and m["motion"], (prompt, m["described"])


def test_render_is_deterministic(pipe):
    call = {**tm.DEFAULT_CALL, "num_inference_steps": 4}
    a = pipe(tm.DEFAULT_PROMPTS[1], generator=torch.Generator().manual_seed(3), **call).frames[0]
    b = pipe(tm.DEFAULT_PROMPTS[1], generator=torch.Generator().manual_seed(3), **call).frames[0]
    np.testing.assert_array_equal(a, b)


def test_training_recipe_runs(tmp_path):
    """A few steps of every stage of the recipe, one process: writes a loadable diffusers folder."""
    from dit_sparse.tiny import train as train_tiny

    out = tmp_path / "tiny_wan"
    threads = torch.get_num_threads()
    try:
        rc = train_tiny.main(["--out", str(out), "--work", str(tmp_path / "work"), "--minutes", "2", "--reserve", "0",
                              "--steps-vae", "2", "--steps-dit", "2", "--clips", "8", "--procs", "1", "--batch", "2",
                              "--eval-every", "100", "--eval-steps", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (out / "training_summary.json").is_file() and (tmp_path / "work" / "vae_stage1.pt").is_file()
    loaded = tm.build_pipeline(out)
    assert loaded.transformer.config.in_channels == tm.TRANSFORMER_CONFIG["in_channels"]
    assert loaded.vae.config.latents_std != [1.0] * loaded.vae.config.z_dim


def test_attention_structure_benchmark_smoke():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-W", "ignore", "benchmarks/attention_structure.py", "--steps", "2",
                          "--prompts", "1", "--no-write"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "block16_top10" in res.stdout
