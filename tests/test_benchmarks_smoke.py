"""The benchmark scripts keep working: CPU dry runs on tiny shapes, and a clear refusal without a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "-W", "ignore", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("script,extra", [("attention.py", ["--densities", "1.0,0.25"]), ("plan_overhead.py", []),
                                          ("end_to_end.py", []), ("layer_breakdown.py", [])])
def test_smoke_run_prints_a_table(script, extra):
    res = run(f"benchmarks/{script}", "--smoke", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "----" in res.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("script", ["attention.py", "plan_overhead.py", "end_to_end.py", "layer_breakdown.py",
                                    "gpu_suite.py"])
def test_refuses_without_gpu(script, tmp_path):
    res = run(f"benchmarks/{script}", *([str(tmp_path)] if script == "gpu_suite.py" else []))
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr


@pytest.mark.parametrize("script", ["attention.py", "plan_overhead.py", "end_to_end.py", "layer_breakdown.py",
                                    "gpu_suite.py"])
def test_help(script):
    res = run(f"benchmarks/{script}", "--help")
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr[-2000:]


def test_gpu_suite_dry_run_lists_every_stage_within_8_minutes():
    res = run("benchmarks/gpu_suite.py", "unused_out", "--dry-run")
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("tests", "op", "breakdown", "end_to_end"):
        assert f"[{stage}," in res.stdout
    assert "-m gpu" in res.stdout and "TRITON_INTERPRET" not in res.stdout  # set in the environment, not argv
    total = int(res.stdout.strip().splitlines()[-1].split()[2])
    assert total <= 8 * 60


def test_gpu_suite_smoke_writes_json_and_summary(tmp_path):
    """The suite's pipeline on CPU: a benchmark stage in smoke mode, its JSON merged, the summary rendered."""
    import json

    res = run("benchmarks/gpu_suite.py", str(tmp_path), "--smoke", "--stages", "tests,breakdown")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "suite.log", "summary.md"]
    payload = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [s["status"] for s in payload["stages"]] == ["skipped (needs CUDA)", "ok"]
    rows = payload["results"]["breakdown"]["rows"]
    assert rows and {"kernel_ms", "engine_ms", "padded_tokens", "tokens"} <= set(rows[0])
    summary = (tmp_path / "summary.md").read_text()
    assert "Sparse layer call" in summary and "| yes |" not in summary and "not measured" in summary


def test_suite_runs_from_another_folder(tmp_path):
    """As the README shows it, from outside the repository: the scripts find the package themselves."""
    for script, args in (("gpu_suite.py", [str(tmp_path / "out"), "--dry-run"]), ("layer_breakdown.py", ["--help"])):
        res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script), *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("script,extra", [("pooled_peers.py", ["--smoke", "--ratios", "0.25"]),
                                          ("row_safeguard.py", ["--small", "--seeds", "1"]),
                                          ("row_safeguard.py", ["--outliers", "--smoke"]),
                                          ("preset_density.py", ["--steps", "2"])])
def test_pooled_benchmarks_run_from_another_folder(script, extra, tmp_path):
    """As the README shows them (python benchmarks/...), started from another folder."""
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script), *extra], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "draft" in res.stdout  # every script prints its draft rows
