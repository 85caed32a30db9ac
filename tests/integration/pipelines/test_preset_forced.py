"""No preset forces more than a quarter of its row budget at its target grid.

Forced = the video key blocks a row keeps whatever the input (``dit_sparse.methods.forced``). Counted from the
config for every preset here; measured (the blocks the engine keeps for every one of 4 unrelated inputs) by
``python benchmarks/preset_forced.py``, whose record ``benchmarks/results/preset-forced-cpu.json`` is checked
against a fresh count, recomputed where the grid is small, and quoted by the README's forced-share table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.preset_forced import (
    MAX_SHARE,
    preset_layout,
    preset_row,
    quality_table,
    readme_table,
    uncapped,
)
from dit_sparse.integration.pipelines.presets import PRESETS
from dit_sparse.methods.forced import forced_blocks

ROOT = Path(__file__).resolve().parents[3]
RECORD = ROOT / "benchmarks/results/preset-forced-cpu.json"


def _rows() -> dict[str, dict]:
    return {r["preset"]: r for r in json.loads(RECORD.read_text())["rows"]}


@pytest.mark.parametrize("name", list(PRESETS))
def test_no_preset_forces_more_than_a_quarter_of_its_budget(name):
    p = PRESETS[name]
    f = forced_blocks(p.config, preset_layout(p))
    if f.method == "window":  # a neighbourhood window alone: static by design, no budget to share
        assert p.config.draft is None and f.budget is None
        return
    assert f.share <= MAX_SHARE, (
        f"{name}: {f.forced_max} forced video blocks per row of a {f.budget}-block budget "
        f"({f.share:.0%} > {MAX_SHARE:.0%}); fix: sink_share / neighbour_share, or a "
        "lower sparsity"
    )
    assert f.committed_share <= MAX_SHARE, (
        f"{name}: forced {f.forced_max} + sink quota {f.reserved} of "
        f"{f.budget} blocks ({f.committed_share:.0%} > {MAX_SHARE:.0%})"
    )


def test_the_record_walks_every_preset_and_matches_a_fresh_count():
    rows = _rows()
    assert list(rows) == list(PRESETS), "rerun python benchmarks/preset_forced.py"
    for name, row in rows.items():
        p = PRESETS[name]
        layout = preset_layout(p)
        f = forced_blocks(p.config, layout)
        assert (row["method"], row["budget"], row["forced"], row["reserved"], row["video_blocks"]) == (
            f.method,
            f.budget,
            f.forced_max,
            f.reserved,
            f.video_blocks,
        ), name
        assert row["forced_uncapped"] == forced_blocks(uncapped(p.config), layout).forced_max, name
        if f.method == "window":
            continue
        # the honest count: forced blocks are in every mask, and 4 unrelated inputs keep no more than the cap
        assert row["measured_forced_mean"] >= row["forced_mean"] - 0.01, name
        assert row["measured_mean_share"] <= MAX_SHARE, (name, row)


@pytest.mark.parametrize("name", [n for n in PRESETS if preset_layout(PRESETS[n]).seq_len <= 5000])
def test_measured_share_recomputed_on_small_grids(name):
    row = preset_row(PRESETS[name])
    rec = _rows()[name]
    for key in ("measured_forced", "measured_forced_mean", "measured_share", "measured_mean_share", "density"):
        assert row[key] == rec[key], (name, key, row[key], rec[key])


def test_uncapped_sinks_and_neighbours_forced_most_of_the_budget():
    """Why the caps: every frame-0 block as the draft sink forces 50 of the 52 blocks of
    wan2.1-t2v-1.3b:draft-80 at Wan 480p (tile 4x4x8); every 3-D neighbour is more than flux:rectified-90's budget."""
    rows = _rows()
    assert (rows["wan2.1-t2v-1.3b:draft-80"]["forced_uncapped"], rows["wan2.1-t2v-1.3b:draft-80"]["budget"]) == (
        50,
        52,
    )
    assert rows["flux:rectified-90"]["uncapped_share"] > 1
    over = [n for n, r in rows.items() if r["method"] != "window" and r["uncapped_share"] > MAX_SHARE]
    assert len(over) >= 12, over


def test_readme_table_is_generated_from_the_record():
    table = readme_table(list(_rows().values()))
    assert table in (ROOT / "README.md").read_text(), (
        "README's forced-share table differs from "
        "benchmarks/results/preset-forced-cpu.json; paste the table "
        "`python benchmarks/preset_forced.py` prints"
    )


def test_readme_quality_tables_are_generated_from_the_record():
    rows = json.loads((ROOT / "benchmarks/results/preset-forced-quality-cpu.json").read_text())["rows"]
    assert quality_table(rows) in (ROOT / "README.md").read_text(), (
        "README's forced-share quality tables differ from benchmarks/results/preset-forced-quality-cpu.json; paste "
        "the tables `python benchmarks/preset_forced.py --quality` prints"
    )
