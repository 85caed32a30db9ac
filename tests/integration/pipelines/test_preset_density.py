"""Every preset states its measured block density on its target shape, and the real-model presets
use the per-row rectification where they rectify.

The numbers come from ``python benchmarks/preset_density.py --real`` (real-model presets at their models' target
grids, into benchmarks/results/preset-density-cpu.json) and ``python benchmarks/preset_density.py`` (embedded
model). Here every real-model number is recomputed from the current code and compared with both the description and
the results file: draft ``row_topk`` budgets and neighbourhood windows do not depend on the values, so random q/k of
head dim 8 at the full target grid give the same density; Rectified SpaAttn's top-p selection does depend on them,
so it is recomputed on the benchmark's own structured inputs (quoted family, head dim 128) at the full target grid,
one grid's inputs built once for all the presets that share it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks.preset_density import (
    QUOTED_FAMILY,
    TARGETS,
    input_dependent,
    real_presets,
    structured_inputs,
    target_of,
    video_density,
)
from dit_sparse.integration.pipelines.presets import PRESETS

ROOT = Path(__file__).resolve().parents[3]
DENSITY = re.compile(r"measured density (\d\.\d\d)\b")
REAL = [p.name for p in real_presets()]
RESULTS = ROOT / "benchmarks/results/preset-density-cpu.json"
#: the results file rounds to 4 decimals
RECORD_TOL = 5e-5 + 1e-9


def recorded(name: str) -> float:
    """The quoted family's density of ``name`` in the benchmark's results file."""
    rows = json.loads(RESULTS.read_text())["rows"]
    found = [r for r in rows if r["preset"] == name]
    rerun = "rerun python benchmarks/preset_density.py --real"
    assert len(found) == 1, f"{name}: {len(found)} rows in {RESULTS.name}; {rerun}"
    return found[0][f"density {QUOTED_FAMILY}"]


def _layout(name: str):
    t = target_of(PRESETS[name])
    s = t.shape
    return PRESETS[name].config.layout(s.frames, s.height, s.width, s.text, t.text_position)


def _grid_key(name: str):
    """Presets whose structured inputs are the same tensors (same layout, same head dim) share a key."""
    layout = _layout(name)
    return (
        layout.grid,
        layout.tile,
        layout.text_tokens,
        layout.text_position,
        layout.packing,
        target_of(PRESETS[name]).shape.head_dim,
    )


INPUT_DEPENDENT = [n for n in REAL if input_dependent(PRESETS[n])]
GRIDS: dict = {}
for _n in INPUT_DEPENDENT:
    GRIDS.setdefault(_grid_key(_n), []).append(_n)


def quoted(name: str) -> float:
    found = DENSITY.findall(PRESETS[name].description)
    assert len(found) == 1, (
        f"{name}: the description must state one 'measured density X.XX': {PRESETS[name].description!r}"
    )
    return float(found[0])


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_states_its_measured_density(name):
    quoted(name)


@pytest.mark.parametrize("name", REAL)
def test_real_preset_names_its_target_shape_and_input_dependence(name):
    p = PRESETS[name]
    s = target_of(p).shape
    assert f"at {s.frames}x{s.height}x{s.width}" in p.description, p.description
    assert ("on structured inputs" in p.description) == input_dependent(p), p.description


@pytest.mark.parametrize("name", [n for n in REAL if not input_dependent(PRESETS[n])])
def test_value_independent_density_matches_a_fresh_computation(name):
    """Draft top-k budgets and windows: any values give the same density at the target grid."""
    p = PRESETS[name]
    t = target_of(p)
    s = t.shape
    layout = p.config.layout(s.frames, s.height, s.width, s.text, t.text_position)
    g = torch.Generator().manual_seed(1)
    q, k = (layout.permute(torch.randn(1, layout.seq_len, 1, 8, generator=g)) for _ in range(2))
    fresh = video_density(p, layout, q, k)
    assert abs(fresh - quoted(name)) <= 0.005 + 1e-9, f"{name}: measured {fresh:.4f}, description {quoted(name)}"
    assert abs(fresh - recorded(name)) <= RECORD_TOL, (
        f"{name}: measured {fresh:.4f} now, {recorded(name)} in {RESULTS.name}: rerun python "
        "benchmarks/preset_density.py --real"
    )


@pytest.mark.parametrize("names", list(GRIDS.values()), ids=[",".join(v) for v in GRIDS.values()])
def test_input_dependent_density_matches(names):
    """Top-p presets: the density recomputed now, on the benchmark's structured inputs (quoted family) at the full
    target grid, is the one in the results file (benchmarks/results/preset-density-cpu.json) and the one the
    description quotes."""
    layout = _layout(names[0])
    qp, kp = structured_inputs(layout, QUOTED_FAMILY, target_of(PRESETS[names[0]]).shape.head_dim)
    for name in names:
        fresh = video_density(PRESETS[name], _layout(name), qp, kp)
        assert abs(fresh - recorded(name)) <= RECORD_TOL, (
            f"{name}: measured {fresh:.4f} now, {recorded(name)} in {RESULTS.name}: rerun python "
            "benchmarks/preset_density.py --real and update the description"
        )
        assert abs(fresh - quoted(name)) <= 0.005 + 1e-9, f"{name}: measured {fresh:.4f}, description {quoted(name)}"


def test_every_real_preset_has_a_target_shape():
    assert {n.split(":")[0] for n in REAL} <= set(TARGETS)


@pytest.mark.parametrize("name", [n for n in REAL if PRESETS[n].config.draft is not None])
def test_forced_blocks_leave_room_for_the_draft_at_the_target_shape(name):
    """With the frame-0 sink of a 4-frame temporal tile the forced blocks filled the budget of draft-90 at Wan 480p
    and HunyuanVideo 720p: the draft map selected nothing."""
    from dit_sparse.methods.draft_attention import forced_draft_mask, row_budget

    p = PRESETS[name]
    t = target_of(p)
    s = t.shape
    layout = p.config.layout(s.frames, s.height, s.width, s.text, t.text_position)
    nv = layout.num_video_blocks
    forced = int(forced_draft_mask(layout, p.config.draft, "cpu")[:nv, :nv].sum(-1).max())
    budget = row_budget(nv, p.config.draft.sparsity, p.config.draft.k_min)
    assert forced < budget, f"{name}: {forced} forced blocks per row, budget {budget}"


@pytest.mark.parametrize(
    "name", [n for n, p in PRESETS.items() if p.config.rectification is not None and p.config.rectification.rectify]
)
def test_rectifying_presets_use_the_row_combine_unless_named_block(name):
    rect = PRESETS[name].config.rectification
    assert rect.combine == ("block" if name.endswith("-block") else "row"), name
    reuse = PRESETS[name].config.reuse
    assert reuse is None or not reuse.retention  # row mode + Re-ttention is refused by design
