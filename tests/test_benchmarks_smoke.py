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
                                          ("end_to_end.py", [])])
def test_smoke_run_prints_a_table(script, extra):
    res = run(f"benchmarks/{script}", "--smoke", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "----" in res.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.parametrize("script", ["attention.py", "plan_overhead.py", "end_to_end.py"])
def test_refuses_without_gpu(script):
    res = run(f"benchmarks/{script}")
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr


@pytest.mark.parametrize("script,extra", [("pooled_peers.py", ["--smoke", "--ratios", "0.25"]),
                                          ("row_safeguard.py", ["--small", "--seeds", "1"]),
                                          ("preset_density.py", ["--steps", "2"])])
def test_pooled_benchmarks_run_from_another_folder(script, extra, tmp_path):
    """As the README shows them (python benchmarks/...), started from another folder."""
    res = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script), *extra], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "draft" in res.stdout  # every script prints its draft rows
