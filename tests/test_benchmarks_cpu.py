"""The CPU modes of the benchmarks (plan_overhead, pooled_cost, end_to_end, render_speed) on tiny shapes: they run
and their JSON rows carry the fields the results files need (machine, shapes, tokens, density, ms, ratios)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dit_sparse
from benchmarks._common import Shape
from dit_sparse.integration.pipelines.presets import TINY_DEFAULT_PRESET

ROOT = Path(__file__).resolve().parent.parent


def test_plan_overhead_cpu_rows():
    from benchmarks.plan_overhead import run_shape_cpu

    shape = Shape("tiny", 3, 9, 13, 12, text=5, head_dim=16)
    with torch.no_grad():
        row = run_shape_cpu(shape, heads=3, rep=1, dense_heads=2)
    assert (row["tokens"], row["heads"], row["model_heads"], row["dense_timed_heads"]) == (3 * 9 * 13 + 5, 3, 12, 2)
    assert row["padded_tokens"] >= row["tokens"] and row["padded_tokens"] % row["block_size"] == 0
    assert row["dense_ms"] == pytest.approx(row["dense_timed_ms"] * 3 / 2)  # scaled linearly to the plan's heads
    assert "scaled" in row["dense_scaled"]
    for stage in ("draft_map", "draft_select", "draft_csr", "draft_plan", "rect_statistics", "rect_outliers",
                  "rect_select", "rect_segment", "rect_plan"):
        assert row[f"{stage}_ms"] > 0
        assert row[f"{stage}_pct"] == pytest.approx(100 * row[f"{stage}_ms"] / row["dense_ms"])
    assert 0 < row["draft_density"] <= 1 and 0 < row["rect_density"] <= 1 and row["row_outliers"] == 2


def test_plan_overhead_cpu_refuses_more_dense_heads_than_plan_heads():
    res = subprocess.run([sys.executable, "-W", "ignore", "benchmarks/plan_overhead.py", "--device", "cpu",
                          "--heads", "1", "--dense-heads", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--dense-heads must be in [1, --heads=1]" in res.stderr


def test_pooled_cost_cpu_rows_and_skips():
    from benchmarks.pooled_cost import run_cpu

    with torch.no_grad():
        result = run_cpu([Shape("tiny", 2, 16, 16, 4, text=7, head_dim=32)], 2, ["torch", "no-such-backend", None],
                         rep=1, write=False)
    assert result["environment"]["torch"] == torch.__version__ and "path" not in result
    assert [r["backend"] for r in result["rows"]] == ["torch", "auto"]
    for row in result["rows"]:
        assert row["backend_run"] == "torch"  # CPU automatic dispatch runs the segment on the torch backend
        assert row["tokens"] == 2 * 16 * 16 + 7 and row["padded_tokens"] % row["block_size"] == 0
        assert row["row_outliers"] == 2 and row["segment_keys"] > 0 and 0 < row["density"] < 1
        assert row["plain_ms"] > 0 and row["segment_ms"] > 0 and row["dense_sdpa_ms"] > 0
        assert row["segment_cost_pct"] == pytest.approx(100 * (row["segment_ms"] / row["plain_ms"] - 1), abs=0.01)
        assert row["plain_vs_dense"] == pytest.approx(row["plain_ms"] / row["dense_sdpa_ms"])
    (skip,) = result["skipped"]
    assert skip["backend"] == "no-such-backend" and "not registered" in skip["reason"]


def test_end_to_end_cpu_rows_every_layer_sparse():
    from benchmarks.end_to_end import SMOKE, cpu_model, run_model

    with torch.no_grad():
        (row,) = run_model(SMOKE["wan-smoke"], 1, "cpu", torch.float32, 1, warmup=0, backend="torch",
                           keep_dense_layers=False)
    assert row["backend"] == "torch" and row["layers"] == 1 and row["dense_layers_dropped"] == [0]
    assert row["density"] < 1  # the one block ran sparse although the preset keeps block 0 dense
    assert row["step_amdahl_limit"] == pytest.approx(
        1 / ((1 - row["attention_share"]) + row["attention_share"] * row["density"]))
    assert row["step_of_limit"] == pytest.approx(row["step_speedup"] / row["step_amdahl_limit"])
    assert row["tokens"] == 4 * 16 * 16 and row["padded_tokens"] >= row["tokens"]
    model = cpu_model(5)
    assert model.latent == (16, 5, 60, 104)
    assert set(model.presets) == {p.name for p in dit_sparse.list_presets() if p.name.startswith("wan2.1-t2v-1.3b:")}


def test_end_to_end_refuses_an_unregistered_backend():
    res = subprocess.run([sys.executable, "-W", "ignore", "benchmarks/end_to_end.py", "--device", "cpu",
                          "--backend", "no-such-backend"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "'no-such-backend' is not registered" in res.stderr


def test_render_speed_smoke_writes_the_json(tmp_path):
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "render_speed.py"), "--smoke",
                          "--out", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    payload = json.loads((tmp_path / "render_speed-cpu.json").read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert rows["none"]["preset"] is None and rows["default"]["preset"] == TINY_DEFAULT_PRESET
    # the embedded model's 320 tokens are below the CPU's break-even: the default preset runs every call dense
    assert rows["default"]["attention_calls"]["sparse"] == 0 and rows["default"]["attention_calls"]["dense"] > 0
    assert rows["none"]["speedup_vs_stock"] == 1.0
    assert rows["default"]["steps"] == 2 and rows["default"]["tokens"] == rows["none"]["tokens"] > 0
    assert rows["default"]["padded_tokens"] >= rows["default"]["tokens"]
    assert rows["default"]["speedup_vs_stock"] == pytest.approx(
        rows["none"]["denoise_and_decode_s"] / rows["default"]["denoise_and_decode_s"])


def test_attention_cpu_smoke_from_another_folder(tmp_path):
    """The op table's script as a user types it: rows checked against the reference, ratios from one run."""
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks/attention_cpu.py"), "--shapes",
                          "smoke", "--densities", "0.1", "--rep", "1", "--out", str(tmp_path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "attention-cpu.json").read_text())
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["ours_err"] <= 1e-4 and row["ours_segment_err"] <= 1e-4
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["ours_ms"])
    assert row["padded_tokens"] >= row["tokens"] and row["segment_keys"] > 0
    assert data["environment"]["torch"] == torch.__version__ and data["compile_s"]


def test_break_even_finds_the_first_winning_length_and_stores_it(tmp_path):
    from benchmarks.break_even import break_even, store

    rows = [dict(tokens=t, speedup_vs_dense=s) for t, s in ((512, 0.5), (1024, 1.4), (2048, 1.05), (4096, 3.0),
                                                              (8192, 5.0))]
    assert break_even(rows) == 4096  # 1024 wins, 2048 is within the 10% margin: from 4096 on it always wins
    assert break_even([dict(tokens=512, speedup_vs_dense=0.5)]) is None
    path = tmp_path / "break_even.json"
    path.write_text(json.dumps({"devices": {"xpu": {"tokens": 7}}}))
    store("cpu", 4096, dict(density=0.1, block=128, dtype="float32", environment={"torch": "x"}), path)
    data = json.loads(path.read_text())["devices"]
    assert data["cpu"]["tokens"] == 4096 and data["xpu"] == {"tokens": 7}


def test_break_even_script_runs_without_touching_the_package(tmp_path):
    from dit_sparse.backends.break_even import BREAK_EVEN_FILE

    before = BREAK_EVEN_FILE.read_text()
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks/break_even.py"), "--sizes", "256",
                          "--heads", "1", "--head-dim", "16", "--block", "64", "--rep", "1", "--no-store", "--out",
                          str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads((tmp_path / "break-even-cpu.json").read_text())["rows"]
    assert row["tokens"] == 256 and row["dense_sdpa_ms"] > 0 and row["compiled_ms"] > 0
    assert BREAK_EVEN_FILE.read_text() == before
