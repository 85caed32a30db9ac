"""The project's own tiny text-to-video model: a diffusers ``WanPipeline`` trained on synthetic shape videos.

The embedded default model of ``dit_sparse``: it needs no download, runs on a CPU in seconds, and has *trained*
(structured) attention, unlike random-weight test pipelines. Weights ship in ``dit_sparse/tiny/assets/tiny_wan/`` as a
standard diffusers folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) and load through the ordinary ``WanPipeline.from_pretrained`` path::

    from dit_sparse.tiny.model import build_pipeline, DEFAULT_PROMPTS, DEFAULT_CALL
    pipe = build_pipeline()                                   # offline, eval mode, float32, CPU
    video = pipe(DEFAULT_PROMPTS[0], **DEFAULT_CALL).frames[0]  # (17, 64, 64, 3) in [0, 1]

Components (all stock diffusers / transformers classes; exact sizes in :data:`TRANSFORMER_CONFIG` etc.):

* ``WanTransformer3DModel`` (1.24 M parameters): 4 layers, 4 heads x 32 (hidden 128), FFN 512, patch (1, 1, 1),
  24 latent channels, text_dim 32.
* ``AutoencoderKLWan`` (0.85 M parameters): Wan2.2-style residual layout (``is_residual=True``, 2 x 2 pixel
  (un)shuffle ``patch_size=2``), base_dim 16, dim_mult (2, 2, 2), one res block per stage, compression 4 (time) x
  8 x 8 (space), z_dim 24. Trained as an autoencoder on the synthetic clips; ``latents_mean`` / ``latents_std`` in
  its config were measured on them.
* ``UMT5EncoderModel`` (25 k parameters): 2 layers, d_model 32, **frozen random** weights (seed 0). The
  word-level ``T5Tokenizer`` built in memory (:func:`build_tokenizer`, also saved in the folder) gives every
  vocabulary word one token, so the transformer only has to learn what each fixed random word embedding means.
* ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

Transformer and VAE weights are stored as float16 safetensors (4.3 MB for the whole folder) and load back into
float32 modules.

Default render (:data:`DEFAULT_CALL`): 17 frames x 64 x 64 -> latents 24 x 5 x 8 x 8 -> **5 x 8 x 8 = 320 video
tokens** per self-attention (plus cross-attention to the text); about 1 s on one CPU core for 20 steps with
classifier-free guidance. Prompts follow :mod:`dit_sparse.tiny.synthetic`'s grammar (``"a red circle moving right"``,
5 colours x 3 shapes x 5 motions); see :data:`DEFAULT_PROMPTS`. Measured on all 75 prompts x 2 seeds at the
default call: colour 150/150, motion direction 150/150, shape 88/150 (circles always; squares often come out
rounded and read as circles). The training recipe and its numbers are in :mod:`dit_sparse.tiny.train`; the
attention structure is measured by ``benchmarks/attention_structure.py``.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from .synthetic import COLOURS, MOTIONS, SHAPES

__all__ = [
    "ASSET_DIR",
    "DEFAULT_PROMPTS",
    "DEFAULT_CALL",
    "DEFAULT_NEGATIVE_PROMPT",
    "VOCAB_WORDS",
    "TRANSFORMER_CONFIG",
    "VAE_CONFIG",
    "TEXT_ENCODER_CONFIG",
    "SCHEDULER_CONFIG",
    "build_tokenizer",
    "build_text_encoder",
    "build_vae",
    "build_transformer",
    "build_scheduler",
    "build_random_pipeline",
    "build_pipeline",
    "save_pipeline",
    "render_defaults",
    "RENDER_DEFAULTS_FILE",
    "folder_size",
]

#: the shipped diffusers folder
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_wan"

#: prompts for the CLI / demos: every colour, shape and motion appears at least once
DEFAULT_PROMPTS: list[str] = [
    "a red circle moving right",
    "a blue square moving left",
    "a yellow triangle moving down",
    "a green circle moving up",
    "a white square bouncing",
    "a red triangle moving left",
]

#: keyword arguments of the default render job (the resolution and step count the model was trained/tuned for)
DEFAULT_CALL: dict = {
    "height": 64,
    "width": 64,
    "num_frames": 17,
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "max_sequence_length": 32,
    "output_type": "np",
}
DEFAULT_NEGATIVE_PROMPT = ""

#: written beside the pipeline by :func:`save_pipeline` (``dit-sparse`` reads it: ``render_defaults.json``), so a
#: saved or copied folder renders as the embedded model does, not with ``WanPipeline``'s 832 x 480 x 81 defaults
RENDER_DEFAULTS_FILE = "render_defaults.json"


def render_defaults() -> dict:
    """The folder's render defaults (:data:`DEFAULT_CALL` in the job fields' names)."""
    c = DEFAULT_CALL
    return {"steps": c["num_inference_steps"], "frames": c["num_frames"], "height": c["height"], "width": c["width"],
            "guidance_scale": c["guidance_scale"], "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            "pipeline_kwargs": {"max_sequence_length": c["max_sequence_length"]}}

#: one token each in the tokenizer
VOCAB_WORDS: tuple[str, ...] = ("a", "an", "the", *COLOURS, *SHAPES, "moving",
                                *[m for m in MOTIONS if m != "bouncing"], "bouncing")

_CHARS = string.ascii_letters + string.digits + ".,!?'-"

TRANSFORMER_CONFIG: dict = dict(
    patch_size=(1, 1, 1),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=24,
    out_channels=24,
    text_dim=32,
    freq_dim=256,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=128,
)

VAE_CONFIG: dict = dict(
    base_dim=16,
    z_dim=24,
    dim_mult=[2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    dropout=0.0,
    # Wan2.2-style: 2x2 pixel (un)shuffle around the network plus parameter-free average/duplicate shortcuts in
    # every resolution stage; trains several times faster on a CPU than the Wan2.1 layout
    is_residual=True,
    patch_size=2,
    in_channels=12,
    out_channels=12,
    scale_factor_temporal=4,
    scale_factor_spatial=8,
    # replaced by the statistics measured on the synthetic clips after VAE training
    latents_mean=[0.0] * 24,
    latents_std=[1.0] * 24,
)

TEXT_ENCODER_CONFIG: dict = dict(
    vocab_size=128,  # >= len(tokenizer)
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

SCHEDULER_CONFIG: dict = dict(num_train_timesteps=1000, shift=3.0)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_tokenizer():
    """Word-level unigram ``T5Tokenizer`` built from an in-memory vocabulary (no files, no download).

    Every word of :data:`VOCAB_WORDS` is one piece (``"▁red"``); anything else falls back to single characters.
    Ids: 0 pad, 1 eos, 2 unk.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in VOCAB_WORDS]
    seen = {p for p, _ in vocab}
    for piece, score in [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -3.5) for c in _CHARS]:
        if piece not in seen:
            vocab.append((piece, score))
            seen.add(piece)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _seeded(fn, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return fn()
    finally:
        torch.random.set_rng_state(state)


def build_text_encoder(seed: int = 0):
    """The frozen random ``UMT5EncoderModel`` (eval mode)."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(**TEXT_ENCODER_CONFIG)
    return _seeded(lambda: UMT5EncoderModel(cfg), seed).eval().requires_grad_(False)


def build_vae(seed: int = 0, **overrides):
    """A fresh (untrained) ``AutoencoderKLWan`` of the tiny config."""
    from diffusers import AutoencoderKLWan

    return _seeded(lambda: AutoencoderKLWan(**{**VAE_CONFIG, **overrides}), seed)


def build_transformer(seed: int = 0, **overrides):
    """A fresh (random-weight) ``WanTransformer3DModel`` of the tiny config."""
    from diffusers import WanTransformer3DModel

    return _seeded(lambda: WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **overrides}), seed)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def _eval(pipe):
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


def build_random_pipeline(seed: int = 0, vae=None, text_encoder=None):
    """A ``WanPipeline`` of the same configuration with random transformer weights (the attention baseline).

    ``vae`` / ``text_encoder`` default to fresh random ones; pass the trained ones to change only the transformer.
    """
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=build_tokenizer(), text_encoder=text_encoder or build_text_encoder(),
                       vae=vae or build_vae(seed), transformer=build_transformer(seed), scheduler=build_scheduler())
    return _eval(pipe)


def build_pipeline(weights_dir: str | os.PathLike | None = None, torch_dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu"):
    """Load the shipped (or another) tiny Wan folder through ``WanPipeline.from_pretrained``, offline, eval mode.

    Args:
        weights_dir: a diffusers folder written by :func:`save_pipeline`; defaults to :data:`ASSET_DIR`.
        torch_dtype: dtype of the loaded modules (float32 on CPU).
        device: where to put the pipeline.
    """
    from diffusers import WanPipeline

    _offline()
    path = Path(weights_dir) if weights_dir is not None else ASSET_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no diffusers pipeline at {path} (model_index.json missing); train one with "
                                f"`python -m dit_sparse.tiny.train --out {path}`")
    pipe = WanPipeline.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return _eval(pipe.to(device))


def save_pipeline(pipe, out_dir: str | os.PathLike, weights_dtype: torch.dtype | None = torch.float16) -> Path:
    """``save_pretrained`` (safetensors) of a tiny pipeline; returns the folder.

    ``weights_dtype`` (default float16) is the *storage* dtype of the transformer and VAE weights: it halves the
    shipped size, and ``from_pretrained`` loads them back into float32 modules (diffusers casts to the module's
    dtype). The text encoder is always stored in float32.
    """
    import copy

    from diffusers import WanPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if weights_dtype is not None:
        pipe = WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder,
                           vae=copy.deepcopy(pipe.vae).to(weights_dtype),
                           transformer=copy.deepcopy(pipe.transformer).to(weights_dtype), scheduler=pipe.scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    (out / RENDER_DEFAULTS_FILE).write_text(json.dumps(render_defaults(), indent=2) + "\n")
    return out


def folder_size(path: str | os.PathLike | None = None) -> int:
    """Total bytes of the files under ``path`` (default: the shipped folder)."""
    root = Path(path) if path is not None else ASSET_DIR
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
