"""Forced share of every preset at its target grid: the video key blocks a row keeps whatever the input, as a
share of the row's budget (``dit_sparse.methods.forced``).

Per preset (the embedded model's at its 5x8x8 grid, the real-model ones at their model's target grid,
``benchmarks/preset_density.py::TARGETS``):

* counted from the config (``forced_blocks``): forced blocks of the row that forces most, over the budget
  (``share``), and with the budget blocks a rule reserves but the input chooses (the draft sink's frame-0
  quota) added (``committed share``); ``uncapped share``: the same count with ``sink_share=None`` and
  ``neighbour_share=None`` (the draft sink forces every frame-0 block, Rectified SpaAttn every 3-D neighbour);
* measured (``measured_forced``): the blocks the engine's mask keeps for every one of 4 unrelated inputs (random
  normal q/k, two seeds; the structured ``local`` and ``sharp_sparse`` families of ``tests/utils.py``; batch 1,
  1 head of dim 32), per row, over the budget: the mean over rows (``measured mean share``, next to the
  counted ``mean share``: the two differ by the blocks all 4 inputs pick by chance) and the row with most
  (``measured share``: chance agreements pile up in the worst row); and the mean video density of the 4 masks.

Neighbourhood windows (``window``) are static by design and have no budget: their window is reported, no share.
``tests/integration/pipelines/test_preset_forced.py`` fails if a preset forces more than ``MAX_SHARE``.

    python benchmarks/preset_forced.py                       # every preset; about 2 minutes on 2 CPU cores
    python benchmarks/preset_forced.py --only ltx:draft-75   # some, nothing written
    python benchmarks/preset_forced.py --quality             # output error of the sink / neighbour variants

writes benchmarks/results/preset-forced-cpu.json (``--quality``: preset-forced-quality-cpu.json).
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
from dit_sparse.integration.pipelines.presets import (  # noqa: E402
    NEIGHBOUR_SHARE,
    TINY_PRESET_PREFIX,
    Preset,
    list_presets,
)
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
        raise KeyError(
            f"no target shape for preset {preset.name!r}: add {prefix!r} to TARGETS in benchmarks/preset_density.py"
        )
    t: Target = TARGETS[prefix]
    s = t.shape
    return (s.frames, s.height, s.width, s.text, t.text_position), t.label


def preset_layout(preset: Preset):
    grid, _ = target_grid(preset)
    return preset.config.layout(*grid)


def uncapped(config):
    """The config with ``sink_share=None`` and ``neighbour_share=None``: the draft sink forces every frame-0 block,
    rectification every 3-D neighbour."""
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
        out.append(tuple(layout.permute(torch.randn(1, layout.seq_len, 1, head_dim, generator=g)) for _ in range(2)))
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
    row = {
        "preset": preset.name,
        "method": f.method,
        "target": label,
        "video_blocks": f.video_blocks,
        "budget": f.budget,
        "forced": f.forced_max,
        "forced_mean": round(f.forced_mean, 2),
        "reserved": f.reserved,
        "share": _r(f.share),
        "committed_share": _r(f.committed_share),
    }
    whole = forced_blocks(uncapped(preset.config), layout)
    row["forced_uncapped"], row["uncapped_share"] = whole.forced_max, _r(whole.share)
    inputs = unrelated_inputs(layout) if inputs is None else inputs
    m = measured_forced(preset.config, layout, inputs)
    row.update(
        measured_forced=m.forced_max,
        measured_forced_mean=round(m.forced_mean, 2),
        measured_share=_r(m.share),
        measured_mean_share=_r(m.mean_share),
        mean_share=_r(f.mean_share),
        density=_r(m.density),
    )
    return row


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def readme_table(rows: list[dict]) -> str:
    """The README's forced-share table from the results rows (``tests/integration/pipelines/test_preset_forced.py``
    checks that the README holds exactly this)."""
    lines = [
        "| preset | method | budget (blocks / row) | forced (row max) | forced share | sink quota | "
        "measured share (4 inputs) | uncapped share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "window":
            lines.append(f"| `{r['preset']}` | window (static) | - | {r['forced']} | - | - | - | - |")
            continue
        lines.append(
            f"| `{r['preset']}` | {r['method']} | {r['budget']} | {r['forced']} | "
            f"**{_pct(r['share'])}** | {r['reserved'] or '-'} | {_pct(r['measured_mean_share'])} | "
            f"{_pct(r['uncapped_share'])} |"
        )
    return "\n".join(lines)


def quality_table(rows: list[dict]) -> str:
    """The README's quality tables from the ``--quality`` rows: the structured families (error per family, the
    local family's density) and the embedded model."""
    fams = ("diffuse", "local", "sharp_sparse")
    out = [
        "| selection | variant | forced share | error diffuse | error local | error sharp-sparse | density (local) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["group"], r["variant"]) for r in rows if r["input"].startswith("structured")))
    for group, variant in keys:
        by = {r["input"].split()[1]: r for r in rows if (r["group"], r["variant"]) == (group, variant)}
        errs = " | ".join(f"{by[f]['error']:.4f}" for f in fams)
        out.append(
            f"| {group} | {variant} | {_pct(by['local']['forced_share'])} | {errs} | {by['local']['density']:.3f} |"
        )
    out += [
        "",
        "(from benchmarks/results/preset-forced-quality-cpu.json, written by benchmarks/preset_forced.py --quality)",
        "",
        "| embedded model | variant | forced share | density | error |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["input"] == "embedded model":
            out.append(
                f"| `{r['group']}` | {r['variant']} | {_pct(r['forced_share'])} | {r['density']:.3f} | "
                f"{r['error']:.3f} |"
            )
    return "\n".join(out)


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
        print(
            f"{preset.name:<36} {row['method']:<13} budget={row['budget']} forced={row['forced']} "
            f"share={row['share']} mean={row['mean_share']} measured mean={row['measured_mean_share']} "
            f"max={row['measured_share']} uncapped={row['uncapped_share']}",
            flush=True,
        )
    return rows


#: the quality check's grid: Wan-like (21 latent frames, tile 4x4x8: the frame-0 blocks are a whole temporal tile
#: row, 8 of 44 blocks, as 50 of 256 at Wan 480p), small enough for a dense float64 reference on 2 CPU cores
QUALITY_GRID = (21, 8, 32)
QUALITY_TILE = (4, 4, 8)


def _variants():
    from dit_sparse.methods import DraftAttentionConfig, PooledRectificationConfig, SparseAttentionConfig

    def draft(s, **kw):
        return SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=s, **kw), tile=QUALITY_TILE, backend="torch")

    def rect(s, share):
        return SparseAttentionConfig(
            rectification=PooledRectificationConfig(sparsity=s, combine="row", neighbour_share=share),
            tile=QUALITY_TILE,
            backend="torch",
        )

    out = []
    for s in (0.75, 0.8):
        out += [
            (f"draft-{int(s * 100)}", "every frame-0 block forced (sink_share=None)", draft(s, sink_share=None)),
            (f"draft-{int(s * 100)}", "sink_share=0.125 (presets)", draft(s)),
            (f"draft-{int(s * 100)}", "no sink", draft(s, sink=False)),
        ]
    for s in (0.8, 0.85, 0.9):
        out += [
            (f"rectified-{int(s * 100)}", "every 3-D neighbour forced", rect(s, None)),
            (f"rectified-{int(s * 100)}", f"neighbour_share={NEIGHBOUR_SHARE} (presets)", rect(s, NEIGHBOUR_SHARE)),
        ]
    return out


def run_quality(embedded_steps: int = 10) -> list[dict]:
    """Relative output error vs dense attention of the draft presets' selection with the uncapped sink, the
    ``sink_share`` sink and no sink, and of row rectification with all vs the capped neighbours: the structured
    families at :data:`QUALITY_GRID` (float64, 2 heads of dim 32) and the embedded model's captured attention
    (``tiny-wan:*`` presets' own settings, every layer at steps 1, 5, 9 of 10, both CFG branches)."""
    import dataclasses as dc

    sys.path.insert(0, str(ROOT / "tests"))
    from utils import rel_error, structured_family

    from dit_sparse import TokenLayout
    from dit_sparse.integration.pipelines.presets import PRESETS
    from dit_sparse.methods.engine import SparseAttention, dense_attention

    rows = []
    layout = TokenLayout(frames=QUALITY_GRID[0], height=QUALITY_GRID[1], width=QUALITY_GRID[2], tile=QUALITY_TILE)
    for family in ("diffuse", "local", "sharp_sparse"):
        q, k, v = structured_family(layout, family, heads=2, dim=32, dtype=torch.float64)
        ref = dense_attention(q, k, v)
        for group, variant, cfg in _variants():
            engine = SparseAttention(cfg)
            out = engine.sparse_attention(q, k, v, layout=layout)
            nv = layout.num_video_blocks
            density = float(engine.masks()[None][..., :nv, :nv].float().mean())
            f = forced_blocks(cfg, layout)
            rows.append(
                {
                    "input": f"structured {family}",
                    "grid": "x".join(map(str, QUALITY_GRID)),
                    "group": group,
                    "variant": variant,
                    "forced_share": _r(f.share),
                    "density": _r(density),
                    "error": round(rel_error(out, ref), 4),
                }
            )
            print(rows[-1], flush=True)
    from benchmarks.pooled_peers import embedded_inputs

    calls = list(embedded_inputs(embedded_steps))
    tiny = [
        (
            "tiny-wan:draft-75",
            "every frame-0 block forced (sink_share=None)",
            lambda c: dc.replace(c, draft=dc.replace(c.draft, sink=True, sink_share=None)),
        ),
        ("tiny-wan:draft-75", "sink_share=0.125", lambda c: dc.replace(c, draft=dc.replace(c.draft, sink=True))),
        ("tiny-wan:draft-75", "no sink (preset)", lambda c: c),
        (
            "tiny-wan:rectified-80",
            "every 3-D neighbour forced",
            lambda c: dc.replace(c, rectification=dc.replace(c.rectification, neighbour_share=None)),
        ),
        ("tiny-wan:rectified-80", f"neighbour_share={NEIGHBOUR_SHARE} (preset)", lambda c: c),
        ("tiny-wan:draft-rect-80", "the CLI default, at the same density (reference)", lambda c: c),
    ]
    for name, variant, change in tiny:
        cfg = dc.replace(
            change(PRESETS[name].config),
            dense=dc.replace(PRESETS[name].config.dense, dense_fraction=0.0),
            backend="torch",
        )
        errs, dens, share = [], [], None
        for _, _, lay, (q, k, v), scale in calls:
            q, k, v = (t.double() for t in (q, k, v))
            engine = SparseAttention(cfg)
            out = engine.sparse_attention(q, k, v, layout=lay, scale=scale)
            errs.append(rel_error(out, dense_attention(q, k, v, scale)))
            nv = lay.num_video_blocks
            dens.append(float(engine.masks()[None][..., :nv, :nv].float().mean()))
            share = forced_blocks(cfg, lay).share
        rows.append(
            {
                "input": "embedded model",
                "grid": "5x8x8",
                "group": name,
                "variant": variant,
                "forced_share": _r(share),
                "density": _r(sum(dens) / len(dens)),
                "error": round(sum(errs) / len(errs), 4),
                "calls": len(errs),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="a comma list of preset names (nothing is written)")
    ap.add_argument(
        "--quality",
        action="store_true",
        help="the output error of the sink and neighbour variants "
        "(structured families, embedded model): preset-forced-quality-cpu.json; about 3 minutes",
    )
    args = ap.parse_args(argv)
    if args.quality:
        rows = run_quality()
        print()
        print_table(rows, ["input", "group", "variant", "forced_share", "density", "error"])
        path = write_json(
            "preset-forced-quality",
            {"environment": environment(), "grid": QUALITY_GRID, "tile": QUALITY_TILE, "rows": rows},
        )
        print(f"\nwrote {path}\n")
        print(quality_table(rows))
        return 0
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in {p.name for p in list_presets()}]
    if unknown:
        ap.error(f"--only: unknown preset(s) {unknown}; see `dit-sparse presets`")
    rows = run(only)
    print()
    print_table(
        rows,
        [
            "preset",
            "method",
            "budget",
            "forced",
            "reserved",
            "share",
            "committed_share",
            "mean_share",
            "measured_mean_share",
            "measured_share",
            "uncapped_share",
            "density",
        ],
    )
    if only:
        return 0
    path = write_json(
        "preset-forced",
        {
            "environment": environment(),
            "max_share": MAX_SHARE,
            "head_dim": HEAD_DIM,
            "inputs": list(INPUTS),
            "rows": rows,
        },
    )
    print(f"\nwrote {path}\n")
    print(readme_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
