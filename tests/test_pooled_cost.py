"""benchmarks/pooled_cost.py (the fused pooled segment's cost) and pooled_peers.py --presets: CPU paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.pooled_cost import key_counts, run
from dit_sparse import TokenLayout
from dit_sparse.methods.base import keep_blocks

ROOT = Path(__file__).resolve().parent.parent


def _script(tmp_path, *args):
    return subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / args[0]), *args[1:]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (no CUDA)")
def test_cpu_run_says_cuda_only_and_exits_0(tmp_path):
    res = _script(tmp_path, "pooled_cost.py", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "CUDA-only" in res.stdout and "----" in res.stdout  # the reason, and the key-count table
    assert not (tmp_path / "out").exists()  # nothing timed, nothing written
    result = run(tmp_path / "out")
    assert "CUDA" in result["skipped"] and result["key_counts"]


def test_timing_code_runs_on_cpu_smoke(tmp_path):
    res = _script(tmp_path, "pooled_cost.py", "--smoke")
    assert res.returncode == 0, res.stderr[-2000:]
    for variant in ("plain sparse", "block rectification", "row (mean)", "row (outlier)"):
        assert variant in res.stdout


def test_key_counts_against_a_direct_count():
    """Independent count from the layout: kept video blocks + text blocks in slots; the segment walks one pooled
    key per video block ("mean", plus one gate dot each) or M + 1 ("outlier", M = row_outliers exact keys + the
    pooled rest), and reads the skipped ones."""
    rows = key_counts(0.1, shapes=("wan2.1-480p",), row_outliers=(1, 3))
    assert [(r["row_keys"], r["row_outliers"]) for r in rows] == [("mean", None), ("outlier", 1), ("outlier", 3)]
    for row in rows:
        layout = TokenLayout(frames=21, height=30, width=52)
        nv = layout.num_video_blocks
        kept = keep_blocks(nv, 0.9)
        assert (nv, kept) == (256, 26)
        assert row["plan_keys"] == kept * 128
        per_block = 1 if row["row_keys"] == "mean" else row["row_outliers"] + 1
        assert row["segment_keys"] == per_block * nv and row["segment_read"] == per_block * (nv - kept)
        assert row["segment_dots"] == (2 * nv if row["row_keys"] == "mean" else per_block * nv)


def test_readme_quotes_the_computed_key_counts():
    readme = " ".join((ROOT / "README.md").read_text().split())
    rows = key_counts()
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mean, outlier = (next(r for r in rows if r["shape"] == shape and r["row_keys"] == k)
                         for k in ("mean", "outlier"))
        text = (f"({mean['video_blocks']} video blocks, {mean['kept_blocks']} kept, {mean['plan_keys']:,} plan keys"
                f"{' with the text' if shape.startswith('hunyuan') else ''}): `\"mean\"` {mean['dots_pct']}% / "
                f"{mean['read_pct']}%, `\"outlier\"` {outlier['dots_pct']}% / {outlier['read_pct']}%")
        assert text in readme, text


def test_presets_comparison_smoke(tmp_path):
    res = _script(tmp_path, "pooled_peers.py", "--presets", "--smoke")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "row below block on every source" in res.stdout and "rect 0.9" in res.stdout


def test_preset_density_real_mode_from_another_folder(tmp_path):
    res = _script(tmp_path, "preset_density.py", "--real", "--only", "flux:neighborhood,sd3:draft-50")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "flux:neighborhood" in res.stdout and "sd3:draft-50" in res.stdout and "----" in res.stdout
    bad = _script(tmp_path, "preset_density.py", "--real", "--only", "flux:magic")
    assert bad.returncode == 2 and "unknown real-model preset" in bad.stderr
