"""Measured block density of the presets on their own target shapes.

Two modes:

* default: captures q, k of every self-attention layer of the embedded trained model (first default prompt, 10
  steps, both CFG branches, steps 1, 5 and 9), builds each ``tiny-wan:*`` preset's block mask on them and reports
  the mean fraction of video x video block pairs read (sparse calls only; the dense warm-up steps are not counted).
* ``--real``: every real-model preset's block mask at its model's target grid (:data:`TARGETS`: the default
  generation size of the preset's model, in latent patch tokens, with the model's text tokens on their side), on
  the synthetic structured q/k of ``tests/utils.py::structured_family`` (no weights; batch 1, 1 head of dim 128,
  seed 0, one sparse call: dense warm-up steps and dense layers are not counted). Draft ``row_topk`` budgets and
  neighbourhood windows do not depend on the values (forced blocks included), so their number holds for any input
  at that shape; Rectified SpaAttn's top-p over IPAR does, so its number is "on structured inputs" (all three
  families are measured; the presets quote the ``local`` one and the JSON keeps the others).

The presets' descriptions quote these numbers; ``tests/integration/pipelines/test_preset_density.py`` recomputes them.

    python benchmarks/preset_density.py          # embedded model; about 1 minute on 2 CPU cores
    python benchmarks/preset_density.py --real   # real-model presets at their target grids; about 3 minutes
    python benchmarks/preset_density.py --real --only flux:rectified-90,sd3:draft-50   # some, nothing written

``--real`` writes benchmarks/results/preset-density-cpu.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import SHAPES, Shape, environment, print_table, write_json  # noqa: E402
from dit_sparse.integration.pipelines.presets import TINY_PRESET_PREFIX, Preset, list_presets  # noqa: E402
from dit_sparse.methods.engine import SparseAttention  # noqa: E402

#: quoted family of the input-dependent presets; the others are reported too
QUOTED_FAMILY = "local"


@dataclass(frozen=True)
class Target:
    """A preset's target shape: the grid (latent patch tokens), text tokens in the self-attention call and their
    side, and where the size comes from."""

    shape: Shape
    text_position: str = "after"
    source: str = ""

    @property
    def label(self) -> str:
        s = self.shape
        return f"{s.frames}x{s.height}x{s.width} ({self.source})"


def _img(name, text, side, source):  # 1024 x 1024 image models: 16x spatial (VAE 8 x patch 2) -> 64 x 64
    return Target(Shape(name, 1, 64, 64, 1, text=text), side, source)


#: preset-name prefix (before ":") -> target: each model's default generation size (diffusers pipeline defaults
#: or the paper's setting, docs/models.md#grids); text counts of the joint-attention models are their max lengths
TARGETS: dict[str, Target] = {
    "wan2.1-t2v-1.3b": Target(SHAPES["wan2.1-480p"], source="Wan2.1 480p, 81 frames"),
    "wan2.1-t2v-14b": Target(SHAPES["wan2.1-720p"], source="Wan2.1 720p, 81 frames"),
    "wan2.2-t2v-a14b": Target(SHAPES["wan2.1-720p"], source="Wan2.2 720p, 81 frames"),
    "hunyuanvideo": Target(SHAPES["hunyuan-720p"], source="HunyuanVideo 720p, 129 frames, 256 text tokens"),
    "cogvideox": Target(Shape("cogvideox1.5-768p", 11, 48, 80, 1, text=226), "before",
                        "CogVideoX1.5 768x1280, 81 frames, 226 text tokens"),
    "cogvideox-2b": Target(Shape("cogvideox-480p", 13, 30, 45, 1, text=226), "before",
                           "CogVideoX 480x720, 49 frames, 226 text tokens"),
    "ltx": Target(Shape("ltx-512p", 21, 16, 22, 1), source="LTX-Video 512x704, 161 frames"),
    "flux": _img("flux-1024", 512, "before", "FLUX.1 1024x1024, 512 text tokens"),
    "sd3": _img("sd3-1024", 333, "after", "SD3 1024x1024, 333 text tokens"),
    "wan-vace": Target(SHAPES["wan2.1-480p"], source="Wan2.1 480p, 81 frames"),
    "wan-vace-14b": Target(SHAPES["wan2.1-720p"], source="Wan2.1 720p, 81 frames"),
    "wan-animate": Target(SHAPES["wan2.1-720p"], source="Wan 720p, 81 frames"),
    "skyreels-v2": Target(Shape("skyreels-540p", 25, 34, 60, 1), source="SkyReels-V2 544x960, 97 frames"),
    "qwenimage": _img("qwenimage-1024", 0, "before", "Qwen-Image 1024x1024, no text"),
    "hunyuanvideo15": Target(Shape("hunyuanvideo15-480p", 31, 30, 53, 1),
                             source="HunyuanVideo 1.5 480x848, 121 frames, no text"),
    "ltx2": Target(Shape("ltx2-512p", 16, 16, 24, 1), source="LTX-2 512x768, 121 frames"),
    "cosmos": Target(Shape("cosmos-704p", 24, 44, 80, 1), source="Cosmos-Predict2 704x1280, 93 frames"),
    "mochi": Target(Shape("mochi-480p", 28, 30, 53, 1, text=256), source="Mochi 480x848, 163 frames, 256 text tokens"),
    "flux2": _img("flux2-1024", 512, "before", "FLUX.2 1024x1024, 512 text tokens"),
    "kandinsky6": Target(Shape("kandinsky6-512p", 31, 32, 48, 1), source="Kandinsky 6 512x768, 121 frames"),
}


def real_presets() -> list[Preset]:
    return [p for p in list_presets() if not p.name.startswith(TINY_PRESET_PREFIX)]


def target_of(preset: Preset) -> Target:
    prefix = preset.name.split(":")[0]
    if prefix not in TARGETS:
        raise KeyError(f"no target shape for preset {preset.name!r}: add {prefix!r} to TARGETS in "
                       "benchmarks/preset_density.py")
    return TARGETS[prefix]


def input_dependent(preset: Preset) -> bool:
    """True when the preset's mask depends on the q/k values (Rectified SpaAttn's own top-p selection)."""
    cfg = preset.config
    return cfg.draft is None and cfg.neighborhood is None and cfg.rectification is not None


def structured_inputs(layout, family: str = QUOTED_FAMILY, head_dim: int = 128, seed: int = 0):
    """Permuted float32 ``(q, k)`` of one structured family for ``layout`` (batch 1, 1 head)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from utils import structured_family

    q, k, _ = structured_family(layout, family, heads=1, dim=head_dim, seed=seed, dtype=torch.float32)
    return layout.permute(q), layout.permute(k)


def video_density(preset: Preset, layout, qp, kp, scale: float | None = None) -> float:
    """Fraction of video x video block pairs the preset's mask reads on permuted ``qp``, ``kp``."""
    mask = SparseAttention(preset.config).build_mask(qp, kp, layout, scale)
    nv = layout.num_video_blocks
    return float(mask[..., :nv, :nv].float().mean())


def real_density(preset: Preset, family: str = QUOTED_FAMILY, target: Target | None = None) -> dict:
    """The preset's video x video density at its target shape (or ``target``) on one structured family."""
    target = target_of(preset) if target is None else target
    s = target.shape
    layout = preset.config.layout(s.frames, s.height, s.width, s.text, target.text_position)
    qp, kp = structured_inputs(layout, family, s.head_dim)
    return {"preset": preset.name, "shape": f"{s.frames}x{s.height}x{s.width}", "text": s.text,
            "tokens": s.tokens, "video_blocks": layout.num_video_blocks, "family": family,
            "density": video_density(preset, layout, qp, kp)}


def run_real(families=("diffuse", "local", "sharp_sparse"), only=None) -> list[dict]:
    rows = []
    cache: dict = {}
    for preset in real_presets():
        if only and preset.name not in only:
            continue
        target = target_of(preset)
        s = target.shape
        layout = preset.config.layout(s.frames, s.height, s.width, s.text, target.text_position)
        fams = families if input_dependent(preset) else (QUOTED_FAMILY,)
        row = {"preset": preset.name, "target": target.label, "tokens": s.tokens,
               "video_blocks": layout.num_video_blocks, "input_dependent": input_dependent(preset)}
        for fam in fams:
            key = (s, target.text_position, layout.tile, fam)
            if key not in cache:
                cache = {key: structured_inputs(layout, fam, s.head_dim)}  # one grid's inputs at a time
            row[f"density {fam}"] = round(video_density(preset, layout, *cache[key]), 4)
        rows.append(row)
        print(f"{preset.name:<36} {target.label:<60} " + " ".join(
            f"{k.split()[1]}={v:.3f}" for k, v in row.items() if k.startswith("density")), flush=True)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the capture")
    ap.add_argument("--real", action="store_true", help="real-model presets at their target grids")
    ap.add_argument("--only", default="", help="with --real: a comma list of preset names (nothing is written)")
    args = ap.parse_args(argv)
    if args.real:
        only = [n for n in args.only.split(",") if n]
        unknown = [n for n in only if n not in {p.name for p in real_presets()}]
        if unknown:
            ap.error(f"--only: unknown real-model preset(s) {unknown}; see `dit-sparse presets`")
        rows = run_real(only=only)
        cols = ["preset", "tokens", "video_blocks", "density diffuse", "density local", "density sharp_sparse"]
        print()
        print_table(rows, cols)
        if only:
            return 0
        path = write_json("preset-density", {"environment": environment(), "quoted_family": QUOTED_FAMILY,
                                             "rows": rows})
        print(f"\nwrote {path}")
        return 0
    from benchmarks.pooled_peers import embedded_inputs

    calls = list(embedded_inputs(args.steps))
    rows = []
    for preset in list_presets():
        if not preset.name.startswith(TINY_PRESET_PREFIX):
            continue
        dens = [video_density(preset, layout, layout.permute(q), layout.permute(k), scale)
                for _, _, layout, (q, k, _v), scale in calls]
        rows.append({"preset": preset.name, "calls": len(dens), "density": round(sum(dens) / len(dens), 3)})
    print_table(rows, ["preset", "calls", "density"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
