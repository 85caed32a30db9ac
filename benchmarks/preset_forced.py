"""Forced share of every preset at its target grid: the video key blocks a row keeps whatever the input, as a
share of the row's budget (``dit_sparse.methods.forced``).

Per preset (the embedded model's at its 5x8x8 grid, the real-model ones at their model's target grid,
``benchmarks/preset_density.py::TARGETS``):

* counted from the config (``forced_blocks``): forced blocks of the row that forces most, over the budget
  (``share``), and with the budget blocks a rule reserves but the input chooses (the draft sink's frame-0
  quota) added (``committed share``); ``share before``: the same count under the former rules (every frame-0
  block forced by the draft sink, every 3-D neighbour forced by Rectified SpaAttn);
* measured (``measured_forced``): the blocks the engine's mask keeps for every one of 4 unrelated inputs (random
  normal q/k, two seeds; the structured ``local`` and ``sharp_sparse`` families of ``tests/utils.py``; batch 1,
  1 head of dim 32), per row, over the budget: the mean over rows (``measured mean share``, next to the
  counted ``mean share``: the two differ by the blocks all 4 inputs pick by chance) and the row with most
  (``measured share``: chance agreements pile up in the worst row); and the mean video density of the 4 masks.

Neighbourhood windows (``window``) are static by design and have no budget: their window is reported, no share.
``tests/integration/pipelines/test_preset_forced.py`` fails if a preset forces more than ``MAX_SHARE``.

    python benchmarks/preset_forced.py                       # every preset; about 2 minutes on 2 CPU cores
    python benchmarks/preset_forced.py --only ltx:draft-75   # some, nothing written

writes benchmarks/results/preset-forced-cpu.json.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import environment, print_table, write_json  # noqa: E402
from benchmarks.preset_density import TARGETS, Target, structured_inputs  # noqa: E402
from dit_sparse.integration.pipelines.presets import TINY_PRESET_PREFIX, Preset, list_presets  # noqa: E402
from dit_sparse.methods.forced import forced_blocks, measured_forced  # noqa: E402

#: the most a preset may force of its row budget
MAX_SHARE = 0.25
#: the embedded model's grid (dit_sparse.tiny.model: 5 latent frames of 8 x 8 patch tokens, no text)
TINY_GRID = (5, 8, 8)
HEAD_DIM = 32
INPUTS = ("random seed 1", "random seed 2", "structured local", "structured sharp_sparse")


def target_grid(preset: Preset) -> tuple[tuple[int, int, int, int, str], str]:
    """``((frames, height, width, text_tokens, text_position), label)`` of the preset's target grid."""
    if preset.name.startswith(TINY_PRESET_PREFIX):
        return (*TINY_GRID, 0, "after"), "5x8x8 (the embedded model)"
    prefix = preset.name.split(":")[0]
    if prefix not in TARGETS:
        raise KeyError(f"no target shape for preset {preset.name!r}: add {prefix!r} to TARGETS in "
                       "benchmarks/preset_density.py")
    t: Target = TARGETS[prefix]
    s = t.shape
    return (s.frames, s.height, s.width, s.text, t.text_position), t.label


def preset_layout(preset: Preset):
    grid, _ = target_grid(preset)
    return preset.config.layout(*grid)


def former_rules(config):
    """The config under the former rules: the draft sink forces every frame-0 block, rectification every
    3-D neighbour."""
    changes = {}
    if config.draft is not None:
        changes["draft"] = dataclasses.replace(config.draft, sink_share=None)
    if config.rectification is not None:
        changes["rectification"] = dataclasses.replace(config.rectification, neighbour_share=None)
    return dataclasses.replace(config, **changes)


def unrelated_inputs(layout, head_dim: int = HEAD_DIM):
    """The 4 unrelated permuted float32 ``(q, k)`` of :data:`INPUTS` for ``layout``."""
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        out.append(tuple(layout.permute(torch.randn(1, layout.seq_len, 1, head_dim, generator=g))
                         for _ in range(2)))
    for family in ("local", "sharp_sparse"):
        out.append(structured_inputs(layout, family, head_dim))
    return out


def _r(x):
    return None if x is None else round(x, 4)


def preset_row(preset: Preset, inputs=None) -> dict:
    """One results row; ``inputs``: :func:`unrelated_inputs` of the preset's layout (built when None)."""
    layout = preset_layout(preset)
    _, label = target_grid(preset)
    f = forced_blocks(preset.config, layout)
    row = {"preset": preset.name, "method": f.method, "target": label, "video_blocks": f.video_blocks,
           "budget": f.budget, "forced": f.forced_max, "forced_mean": round(f.forced_mean, 2),
           "reserved": f.reserved, "share": _r(f.share), "committed_share": _r(f.committed_share)}
    try:
        before = forced_blocks(former_rules(preset.config), layout)
        row["forced_before"], row["share_before"] = before.forced_max, _r(before.share)
    except ValueError as e:  # pragma: no cover - the former rules never fail to count
        row["forced_before"], row["share_before"] = None, str(e)
    inputs = unrelated_inputs(layout) if inputs is None else inputs
    m = measured_forced(preset.config, layout, inputs)
    row.update(measured_forced=m.forced_max, measured_forced_mean=round(m.forced_mean, 2),
               measured_share=_r(m.share), measured_mean_share=_r(m.mean_share), mean_share=_r(f.mean_share),
               density=_r(m.density))
    return row


def run(only=None) -> list[dict]:
    rows, cache = [], {}
    for preset in list_presets():
        if only and preset.name not in only:
            continue
        layout = preset_layout(preset)
        key = (layout.grid, layout.text_tokens, layout.text_position, layout.tile, layout.packing)
        if key not in cache:
            cache = {key: unrelated_inputs(layout)}  # one grid's inputs at a time
        row = preset_row(preset, cache[key])
        rows.append(row)
        print(f"{preset.name:<36} {row['method']:<13} budget={row['budget']} forced={row['forced']} "
              f"share={row['share']} mean={row['mean_share']} measured mean={row['measured_mean_share']} "
              f"max={row['measured_share']} before={row['share_before']}", flush=True)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="a comma list of preset names (nothing is written)")
    args = ap.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in {p.name for p in list_presets()}]
    if unknown:
        ap.error(f"--only: unknown preset(s) {unknown}; see `dit-sparse presets`")
    rows = run(only)
    print()
    print_table(rows, ["preset", "method", "budget", "forced", "reserved", "share", "committed_share",
                       "mean_share", "measured_mean_share", "measured_share", "share_before", "density"])
    if only:
        return 0
    path = write_json("preset-forced", {"environment": environment(), "max_share": MAX_SHARE,
                                        "head_dim": HEAD_DIM, "inputs": list(INPUTS), "rows": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
