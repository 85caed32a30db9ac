"""Every preset states its measured block density on its target shape, and the real-model presets
use the per-row rectification where they rectify.

The numbers come from ``python benchmarks/preset_density.py --real`` (real-model presets at their models' target
grids) and ``python benchmarks/preset_density.py`` (embedded model). Here they are recomputed where it is cheap:
draft ``row_topk`` budgets and neighbourhood windows do not depend on the values, so random q/k of head dim 8 at the
full target grid give the same density; Rectified SpaAttn's top-p selection does depend on them, so it is recomputed
on the structured inputs where the target grid is small (FLUX-sized, 4,608 tokens) and checked against the
benchmark's JSON record elsewhere.
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
    real_density,
    real_presets,
    target_of,
    video_density,
)
from dit_sparse.integration.pipelines.presets import PRESETS

ROOT = Path(__file__).resolve().parents[3]
DENSITY = re.compile(r"measured density (\d\.\d\d)\b")
REAL = [p.name for p in real_presets()]


def quoted(name: str) -> float:
    found = DENSITY.findall(PRESETS[name].description)
    assert len(found) == 1, f"{name}: the description must state one 'measured density X.XX': " \
                            f"{PRESETS[name].description!r}"
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


@pytest.mark.parametrize("name", [n for n in REAL if input_dependent(PRESETS[n])])
def test_input_dependent_density_matches(name):
    """Top-p presets: recomputed on the structured inputs when the target grid is small, else checked against the
    benchmark's record (benchmarks/results/preset-density-cpu.json), which the description must quote."""
    p = PRESETS[name]
    if target_of(p).shape.tokens <= 5000:
        fresh = real_density(p)["density"]
    else:
        rows = json.loads((ROOT / "benchmarks/results/preset-density-cpu.json").read_text())["rows"]
        fresh = next(r for r in rows if r["preset"] == name)[f"density {QUOTED_FAMILY}"]
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


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.config.rectification is not None
                                  and p.config.rectification.rectify])
def test_rectifying_presets_use_the_row_combine_unless_named_block(name):
    rect = PRESETS[name].config.rectification
    assert rect.combine == ("block" if name.endswith("-block") else "row"), name
    reuse = PRESETS[name].config.reuse
    assert reuse is None or not reuse.retention  # row mode + Re-ttention is refused by design
