"""Named presets: a model family, its hub id, and a :class:`~dit_sparse.SparseAttentionConfig`.

Defaults follow docs/models.md#preset-defaults:
the sparsity in a preset name is the *requested* fraction of video x video blocks skipped. Steps are counted by
index; ``dense_fraction`` needs the pipeline's step count (known inside a pipeline call).

    dit_sparse.list_presets()                       # every preset, with its description
    dit_sparse.apply(pipe, "hunyuanvideo:rectified-90")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...methods import (
    DensePolicy,
    DraftAttentionConfig,
    NeighborhoodConfig,
    PooledRectificationConfig,
    SparseAttentionConfig,
    TemporalReuseConfig,
)
from ..adapters.registry import FAMILIES

__all__ = ["Preset", "PRESETS", "list_presets", "get_preset", "TINY_PRESET_PREFIX", "TINY_DEFAULT_PRESET",
           "default_preset_for", "with_min_tokens"]

#: presets for the embedded tiny model (``dit_sparse.tiny.model``): 5 x 8 x 8 = 320 video tokens, so 16-token
#: blocks (tile 1 x 4 x 4, 20 blocks) instead of 128. Their descriptions give the block density each one reaches on
#: the embedded model (``python benchmarks/preset_density.py``), which is not 1 - sparsity: forced blocks (diagonal,
#: frame-0 sink, neighbours) and the k_min floor dominate on 20 blocks.
TINY_PRESET_PREFIX = "tiny-wan:"
TINY_DEFAULT_PRESET = "tiny-wan:draft-rect-80"

@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    model_id: str
    description: str
    config: SparseAttentionConfig

    @property
    def transformer_class(self) -> str:
        return FAMILIES[self.family].transformer


def _dense(**rules):
    """Every preset's dense policy: its own rules, and calls below the device's measured break-even run dense
    (``min_tokens="auto"``: on a CPU a sparse call over fewer tokens is slower than dense SDPA)."""
    return DensePolicy(min_tokens="auto", **rules)


def _draft(sparsity, sink=True, **dense):
    return SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=sparsity, sink=sink), dense=_dense(**dense))


#: Rectified SpaAttn's forced 3-D neighbours, capped to the nearest fifth of its top-k budget: no preset forces more
#: than a quarter of its row budget (tests/integration/pipelines/test_preset_forced.py, ``python
#: benchmarks/preset_forced.py``), with room for the blocks unrelated inputs share by chance. The draft sink takes
#: its default eighth of the budget (``DraftAttentionConfig.sink_share``: frame-0 blocks chosen by the map).
NEIGHBOUR_SHARE = 0.2


def _rectified(sparsity, combine="row", **dense):
    """Rectified SpaAttn's own selection; ``combine="row"`` (the real-model presets' default: lower error than
    ``"block"`` on every input family measured, ``python benchmarks/pooled_peers.py --presets``); its forced
    neighbours capped to the nearest ``NEIGHBOUR_SHARE`` of its top-k budget."""
    return SparseAttentionConfig(rectification=PooledRectificationConfig(sparsity=sparsity, combine=combine,
                                                                         neighbour_share=NEIGHBOUR_SHARE),
                                 dense=_dense(**dense))


_TINY = dict(tile=(1, 4, 4), block_size=16)
# The tiny draft presets turn the first-frame sink off: at 20 blocks per row (4 per latent frame) a budget of 4-5
# blocks leaves a sink_share sink floor(0.125 * 4) = 0 blocks, and every frame-0 block (4) plus the diagonal (1) would
# exceed it (refused at plan time: the "draft" preset would be one static mask;
# tests/integration/pipelines/test_default_preset.py checks that masks follow the prompt).

#: the presets of each model family (:data:`~dit_sparse.integration.adapters.registry.FAMILIES`), as
#: ``(name, model_id, description, config)``, in the order :func:`list_presets` gives them
_FAMILY_PRESETS: dict[str, list[tuple[str, str, str, SparseAttentionConfig]]] = {
    "wan": [
        # the embedded tiny model (model_id "embedded": shipped inside the package)
        ("tiny-wan:draft-rect-80", "embedded",
         "Embedded model: draft 80% + per-row pooled rectification (combine='row', fused into the kernel), first "
         "20% steps dense (the CLI default); measured density 0.20 on the embedded model",
         SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False),
                               rectification=PooledRectificationConfig(combine="row"),
                               dense=_dense(dense_fraction=0.2), **_TINY)),
        ("tiny-wan:draft-75", "embedded",
         "Embedded model: DraftAttention 75%, first 20% steps dense; measured density 0.25",
         SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.75, sink=False),
                               dense=_dense(dense_fraction=0.2), **_TINY)),
        ("tiny-wan:rectified-80", "embedded",
         "Embedded model: Rectified SpaAttn 80% (own selection) + per-row rectification (combine='row'), first 20% "
         "steps dense; measured density 0.20 (no forced neighbours: a fifth of its 4-block top-k is none)",
         SparseAttentionConfig(rectification=PooledRectificationConfig(sparsity=0.8, combine="row",
                                                                       neighbour_share=NEIGHBOUR_SHARE),
                               dense=_dense(dense_fraction=0.2), **_TINY)),
        ("tiny-wan:neighborhood", "embedded",
         "Embedded model: 3x1x1-tile window (time), 20% dense steps; measured density 0.15",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(3, 1, 1)),
                               dense=_dense(dense_fraction=0.2), **_TINY)),
        ("tiny-wan:retention", "embedded",
         "Embedded model: draft 80% reused across steps with Re-ttention (cache step every 4), 20% dense steps; "
         "measured density 0.20",
         SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False),
                               reuse=TemporalReuseConfig(refresh_period=4, retention=True),
                               dense=_dense(dense_fraction=0.2), **_TINY)),
        # Wan2.1 (DraftAttention code: 0.75, first 25-30% steps and block 0 dense; Rectified: blocks 0-1, 5 steps)
        ("wan2.1-t2v-1.3b:draft-75", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
         "DraftAttention 75% (paper default), first 25% steps and block 0 dense"
         "; measured density 0.25 at 21x30x52 (Wan2.1 480p, 81 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
        ("wan2.1-t2v-1.3b:draft-80", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
         "DraftAttention 80%, first 25% steps and block 0 dense"
         "; measured density 0.20 at 21x30x52 (Wan2.1 480p, 81 frames)",
         _draft(0.8, dense_fraction=0.25, dense_layers=(0,))),
        ("wan2.1-t2v-1.3b:rectified-80", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
         "Rectified SpaAttn 80% selection (IPAR top-p) + per-row rectification (combine='row'), blocks 0-1 and "
         "first 5 steps dense"
         "; measured density 0.20 on structured inputs at 21x30x52 (Wan2.1 480p, 81 frames)",
         _rectified(0.8, dense_steps=5, dense_layers=(0, 1))),
        ("wan2.1-t2v-1.3b:draft-90-rect", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
         "Composite: draft selection 90% (no frame-0 sink) + per-row pooled "
         "rectification (combine='row', fused into the kernel), 20% dense steps, block 0 dense"
         "; measured density 0.10 at 21x30x52 (Wan2.1 480p, 81 frames)",
         SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.9, sink=False),
                               rectification=PooledRectificationConfig(combine="row"),
                               dense=_dense(dense_fraction=0.2, dense_layers=(0,)))),
        ("wan2.1-t2v-14b:rectified-75", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
         "Rectified SpaAttn 75% selection + per-row rectification, blocks 0-1 and first 5 steps dense"
         "; measured density 0.25 on structured inputs at 21x45x80 (Wan2.1 720p, 81 frames)",
         _rectified(0.75, dense_steps=5, dense_layers=(0, 1))),
        ("wan2.2-t2v-a14b:rectified-85", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
         "Rectified SpaAttn 85% selection + per-row rectification on both experts, first 2 blocks of each expert "
         "and first 3 steps dense"
         "; measured density 0.15 on structured inputs at 21x45x80 (Wan2.2 720p, 81 frames)",
         _rectified(0.85, dense_steps=3, dense_layers=(0, 1))),
    ],
    # HunyuanVideo (Draft code: 0.9, double blocks 0-1; Rectified: nothing dense)
    "hunyuanvideo": [
        ("hunyuanvideo:draft-90", "hunyuanvideo-community/HunyuanVideo",
         "DraftAttention 90% (no frame-0 sink), first 25% steps and blocks 0-1 dense"
         "; measured density 0.10 at 33x45x80 (HunyuanVideo 720p, 129 frames, 256 text tokens)",
         _draft(0.9, sink=False, dense_fraction=0.25, dense_layers=(0, 1))),
        ("hunyuanvideo:rectified-90", "hunyuanvideo-community/HunyuanVideo",
         "Rectified SpaAttn 90% selection + per-row rectification, no dense warm-up (the paper's 3.33x setting "
         "with our row combine; the paper's block combine: rectified-90-block)"
         "; measured density 0.10 on structured inputs at 33x45x80 (HunyuanVideo 720p, 129 frames, 256 text tokens)",
         _rectified(0.9)),
        ("hunyuanvideo:rectified-90-block", "hunyuanvideo-community/HunyuanVideo",
         "Rectified SpaAttn 90% as in the paper: block combine (per-query-block R, c epilogue), no dense warm-up "
         "(the 3.33x setting of the paper)"
         "; measured density 0.10 on structured inputs at 33x45x80 (HunyuanVideo 720p, 129 frames, 256 text tokens)",
         _rectified(0.9, combine="block")),
        ("hunyuanvideo:rectified-90-warmup", "hunyuanvideo-community/HunyuanVideo",
         "Rectified SpaAttn 90% selection + per-row rectification, first 20% steps dense"
         "; measured density 0.10 on structured inputs at 33x45x80 (HunyuanVideo 720p, 129 frames, 256 text tokens)",
         _rectified(0.9, dense_fraction=0.2)),
        ("hunyuanvideo:neighborhood", "hunyuanvideo-community/HunyuanVideo",
         "Sliding-tile window 3x3x5 tiles, first 20% steps dense"
         "; measured density 0.05 at 33x45x80 (HunyuanVideo 720p, 129 frames, 256 text tokens)",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(3, 3, 5)),
                               dense=_dense(dense_fraction=0.2))),
    ],
    # CogVideoX (Rectified 1.5: 5 dense steps; Re-ttention 2B: 15 full steps then a cache step every 5)
    "cogvideox": [
        ("cogvideox:rectified-85", "THUDM/CogVideoX1.5-5B",
         "Rectified SpaAttn 85% selection + per-row rectification, first 5 steps dense"
         "; measured density 0.16 on structured inputs "
         "at 11x48x80 (CogVideoX1.5 768x1280, 81 frames, 226 text tokens)",
         _rectified(0.85, dense_steps=5)),
        ("cogvideox-2b:retention", "THUDM/CogVideoX-2b",
         "Re-ttention over a static 1x3x3-tile window: 15 dense steps, cache step every 5, lambda 0.04"
         "; measured density 0.07 at 13x30x45 (CogVideoX 480x720, 49 frames, 226 text tokens)",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(1, 3, 3)),
                               reuse=TemporalReuseConfig(refresh_period=5, retention=True),
                               dense=_dense(dense_steps=15))),
    ],
    # LTX-Video
    "ltx": [
        ("ltx:draft-75", "Lightricks/LTX-Video", "DraftAttention 75%, first 25% steps and block 0 dense"
         "; measured density 0.26 at 21x16x22 (LTX-Video 512x704, 161 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
    ],
    # FLUX (Rectified 4096^2 upscaler: 0.9, last 20 single-stream blocks dense: layers 37-56 of 19 + 38)
    "flux": [
        ("flux:neighborhood", "black-forest-labs/FLUX.1-dev",
         "2-D window of 3x3 tiles, first 20% steps dense"
         "; measured density 0.28 at 1x64x64 (FLUX.1 1024x1024, 512 text tokens)",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(1, 3, 3)),
                               dense=_dense(dense_fraction=0.2))),
        ("flux:rectified-90", "black-forest-labs/FLUX.1-dev",
         "Rectified SpaAttn 90% selection + per-row rectification, last 20 single-stream blocks dense (FLUX.1-dev "
         "layout)"
         "; measured density 0.12 on structured inputs at 1x64x64 (FLUX.1 1024x1024, 512 text tokens)",
         _rectified(0.9, dense_layers=tuple(range(37, 57)))),
    ],
    # SD3
    "sd3": [
        ("sd3:draft-50", "stabilityai/stable-diffusion-3-medium-diffusers",
         "DraftAttention 50%, first 25% steps dense"
         "; measured density 0.50 at 1x64x64 (SD3 1024x1024, 333 text tokens)", _draft(0.5, dense_fraction=0.25)),
    ],
    # Wan-derived models (Wan VACE, Wan-Animate, SkyReels-V2) take Wan's settings (same blocks, same grids; no paper
    # numbers of their own)
    "wan-vace": [
        ("wan-vace:draft-75", "Wan-AI/Wan2.1-VACE-1.3B-diffusers",
         "DraftAttention 75% (Wan2.1 paper default), first 25% steps and main block 0 dense"
         "; measured density 0.25 at 21x30x52 (Wan2.1 480p, 81 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
        ("wan-vace-14b:rectified-75", "Wan-AI/Wan2.1-VACE-14B-diffusers",
         "Rectified SpaAttn 75% selection + per-row rectification (Wan2.1-14B setting), main blocks 0-1 and first 5 "
         "steps dense"
         "; measured density 0.25 on structured inputs at 21x45x80 (Wan2.1 720p, 81 frames)",
         _rectified(0.75, dense_steps=5, dense_layers=(0, 1))),
    ],
    "wan-animate": [
        ("wan-animate:rectified-85", "Wan-AI/Wan2.2-Animate-14B-Diffusers",
         "Rectified SpaAttn 85% selection + per-row rectification (Wan2.2-A14B setting), blocks 0-1 and first 3 "
         "steps dense"
         "; measured density 0.15 on structured inputs at 21x45x80 (Wan 720p, 81 frames)",
         _rectified(0.85, dense_steps=3, dense_layers=(0, 1))),
        ("wan-animate:draft-75", "Wan-AI/Wan2.2-Animate-14B-Diffusers",
         "DraftAttention 75%, first 25% steps and block 0 dense"
         "; measured density 0.25 at 21x45x80 (Wan 720p, 81 frames)", _draft(0.75, dense_fraction=0.25,
                                                                           dense_layers=(0,))),
    ],
    "skyreels-v2": [
        ("skyreels-v2:draft-75", "Skywork/SkyReels-V2-T2V-14B-540P-Diffusers",
         "DraftAttention 75% (Wan2.1 architecture), first 25% steps and block 0 dense"
         "; measured density 0.25 at 25x34x60 (SkyReels-V2 544x960, 97 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
        ("skyreels-v2:rectified-75", "Skywork/SkyReels-V2-T2V-14B-540P-Diffusers",
         "Rectified SpaAttn 75% selection + per-row rectification (Wan2.1-14B setting), blocks 0-1 and first 5 "
         "steps dense"
         "; measured density 0.25 on structured inputs at 25x34x60 (SkyReels-V2 544x960, 97 frames)",
         _rectified(0.75, dense_steps=5, dense_layers=(0, 1))),
    ],
    # Qwen-Image takes the image-DiT settings of FLUX / SD3 (docs/models.md#preset-defaults)
    "qwenimage": [
        ("qwenimage:neighborhood", "Qwen/Qwen-Image",
         "2-D window of 3x3 tiles (as FLUX), first 20% steps dense"
         "; measured density 0.28 at 1x64x64 (Qwen-Image 1024x1024, no text)",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(1, 3, 3)),
                               dense=_dense(dense_fraction=0.2))),
        ("qwenimage:draft-50", "Qwen/Qwen-Image",
         "DraftAttention 50% (as SD3), first 25% steps dense"
         "; measured density 0.50 at 1x64x64 (Qwen-Image 1024x1024, no text)", _draft(0.5, dense_fraction=0.25)),
    ],
    # 2025-26 models (HunyuanVideo 1.5, LTX-2, Cosmos, Mochi, FLUX.2, Kandinsky 6): densities and dense warm-up follow
    # the family's peers (docs/models.md#preset-defaults): HunyuanVideo-like joint DiTs like HunyuanVideo (Draft 90%,
    # 25% steps and blocks 0-1 dense; Rectified 90% with 20% warm-up), video DiTs with cross-attention text like Wan /
    # LTX (Draft 75%, 25% steps and block 0 dense), FLUX.2 like FLUX.1 (Rectified 90% with the last 20 single-stream
    # blocks dense).
    "hunyuanvideo15": [
        ("hunyuanvideo15:draft-90", "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
         "DraftAttention 90%, first 25% steps and blocks 0-1 dense (as HunyuanVideo)"
         "; measured density 0.10 at 31x30x53 (HunyuanVideo 1.5 480x848, 121 frames, no text)",
         _draft(0.9, dense_fraction=0.25, dense_layers=(0, 1))),
        ("hunyuanvideo15:rectified-90-warmup", "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v",
         "Rectified SpaAttn 90% selection + per-row rectification, first 20% steps dense (as HunyuanVideo)"
         "; measured density 0.10 on structured inputs at 31x30x53 (HunyuanVideo 1.5 480x848, 121 frames, no text)",
         _rectified(0.9, dense_fraction=0.2)),
    ],
    "ltx2": [
        ("ltx2:draft-75", "Lightricks/LTX-2",
         "DraftAttention 75% on video self-attention (audio and cross paths stock), first 25% steps and block 0 "
         "dense (as LTX-Video)"
         "; measured density 0.25 at 16x16x24 (LTX-2 512x768, 121 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
    ],
    "cosmos": [
        ("cosmos:draft-75", "nvidia/Cosmos-Predict2-2B-Video2World",
         "DraftAttention 75%, first 25% steps and block 0 dense (as Wan: self-attention video, text in "
         "cross-attention)"
         "; measured density 0.25 at 24x44x80 (Cosmos-Predict2 704x1280, 93 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
    ],
    "mochi": [
        ("mochi:draft-75", "genmo/mochi-1-preview",
         "DraftAttention 75%, first 25% steps and block 0 dense (as Wan / LTX-Video)"
         "; measured density 0.25 at 28x30x53 (Mochi 480x848, 163 frames, 256 text tokens)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
    ],
    "flux2": [
        ("flux2:rectified-90", "black-forest-labs/FLUX.2-dev",
         "Rectified SpaAttn 90% selection + per-row rectification, last 20 single-stream blocks dense (FLUX.2-dev "
         "layout: 8 double + 48 single)"
         "; measured density 0.12 on structured inputs at 1x64x64 (FLUX.2 1024x1024, 512 text tokens)",
         _rectified(0.9, dense_layers=tuple(range(36, 56)))),
        ("flux2:neighborhood", "black-forest-labs/FLUX.2-dev",
         "2-D window of 3x3 tiles, first 20% steps dense (as FLUX.1)"
         "; measured density 0.28 at 1x64x64 (FLUX.2 1024x1024, 512 text tokens)",
         SparseAttentionConfig(neighborhood=NeighborhoodConfig(window=(1, 3, 3)),
                               dense=_dense(dense_fraction=0.2))),
    ],
    "kandinsky6": [
        ("kandinsky6:draft-75", "kandinskylab/Kandinsky-6.0-Pro-distill-5s-Diffusers",
         "DraftAttention 75% on video self-attention (text, audio and cross paths stock), first 25% steps and "
         "block 0 dense (as Wan)"
         "; measured density 0.25 at 31x32x48 (Kandinsky 6 512x768, 121 frames)",
         _draft(0.75, dense_fraction=0.25, dense_layers=(0,))),
    ],
}

_ALL = [Preset(name, family, model_id, description, config)
        for family, presets in _FAMILY_PRESETS.items() for name, model_id, description, config in presets]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def list_presets(family: str | None = None) -> list[Preset]:
    """All presets (or one family's), in a stable order."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; expected one of {sorted(FAMILIES)}.")
    return [p for p in _ALL if family is None or p.family == family]


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(PRESETS)} "
                         "(see dit_sparse.list_presets()).") from None


def with_min_tokens(preset: str | SparseAttentionConfig, min_tokens: int | str) -> SparseAttentionConfig:
    """A preset's config (by name, or a config) with ``DensePolicy.min_tokens`` replaced (``0``: every call sparse,
    even below the device's break-even where the presets' ``"auto"`` runs dense)."""
    cfg = get_preset(preset).config if isinstance(preset, str) else preset
    return dataclasses.replace(cfg, dense=dataclasses.replace(cfg.dense, min_tokens=min_tokens))


def default_preset_for(family: str | None, size_class: str, *, experts: int = 1, params: float | None = None,
                       what: str = "the model") -> tuple[str, str]:
    """The preset for a model given without ``--preset``: ``(name, why)``, from its family and size class.

    ``size_class`` is ``"toy"`` (< 50 M parameters), ``"small"`` (< 3 B), ``"large"`` or ``"unknown"``
    (:attr:`dit_sparse.tools.model_rules.ModelRules.size_class`). The embedded model's 16-token-block presets go to
    toy-sized Wan models only, never to a real one. Raises ``LookupError`` when the family has no preset.
    """
    size = f"{params / 1e9:.1f} B" if params and params >= 1e8 else f"{params / 1e6:.1f} M" if params else None
    of = f" ({size} parameters)" if size and "parameters" not in what else ""
    if family == "wan":
        if size_class == "toy":
            return TINY_DEFAULT_PRESET, f"{what} is a toy-sized Wan model{of}, like the embedded one"
        if experts > 1:
            return "wan2.2-t2v-a14b:rectified-85", f"{what} is a two-expert Wan2.2 model{of}"
        if size_class == "large":
            return "wan2.1-t2v-14b:rectified-75", f"{what} is a large Wan model{of} (the 14B class)"
        return "wan2.1-t2v-1.3b:draft-80", f"{what} is a Wan model of the 1.3B class{of}"
    if family == "cogvideox":
        if size_class in ("toy", "small"):
            return "cogvideox-2b:retention", f"{what} is a CogVideoX model of the 2B class{of}"
        return "cogvideox:rectified-85", f"{what} is a CogVideoX model of the 5B class{of}"
    by_family = {"hunyuanvideo": "hunyuanvideo:rectified-90-warmup", "ltx": "ltx:draft-75",
                 "flux": "flux:neighborhood", "sd3": "sd3:draft-50"}
    if family in by_family:
        return by_family[family], f"{what} is a {family} model (the family's general-purpose preset)"
    own = [p.name for p in _ALL if p.family == family and not p.name.startswith(TINY_PRESET_PREFIX)]
    if own:
        return own[0], f"{what} is a {family} model (the family's first preset)"
    raise LookupError(f"no preset for {what} (family {family or 'unknown'}); pass --preset (see "
                      "`dit-sparse presets`) or --preset none")
