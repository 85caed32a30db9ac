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


@pytest.mark.parametrize("script,extra", [("plan_overhead.py", [])])
def test_smoke_run_prints_a_table(script, extra):
    """(attention.py, layer_breakdown.py and end_to_end.py run in smoke mode inside the GPU suite's smoke test.)"""
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
    for stage in ("tests", "op", "hopper_options", "breakdown", "end_to_end", "pooled_cost"):
        assert f"[{stage}," in res.stdout
    tests_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("[tests,"))
    # the compiled kernel tests, the per-backend reference test and the CUDA-graph test, skip reasons shown
    assert "tests/engine/kernels" in tests_line and "-rs" in tests_line and " -x" not in tests_line
    assert "TRITON_INTERPRET" not in res.stdout  # set in the environment, not argv
    op_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("[op,"))
    limit, budget = int(op_line.split("<= ")[1].split(" s]")[0]), float(op_line.split("--budget ")[1].split()[0])
    assert budget < limit  # rows start only while the stage has time left
    total = int(res.stdout.strip().splitlines()[-1].split()[2])
    assert total <= 8 * 60


def test_gpu_suite_smoke_writes_json_and_summary(tmp_path):
    """``gpu_suite.py OUT --smoke`` as a user types it: every benchmark stage in smoke mode on CPU, its JSON merged,
    the summary rendered (no target marked met: smoke numbers measure nothing)."""
    import json

    res = run("benchmarks/gpu_suite.py", str(tmp_path), "--smoke")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "raw", "suite.log", "summary.md"]
    # every stage's JSON under OUT (raw/<stage>/), as the benchmark wrote it
    assert sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*.json")) == [
        "breakdown/layer_breakdown-cpu.json", "end_to_end/end_to_end-cpu.json",
        "hopper_options/hopper_options-cpu.json", "op/attention-cpu.json"]
    payload = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert payload["state"] == "finished"
    assert [(s["stage"], s["status"]) for s in payload["stages"]] == [
        ("tests", "skipped (needs CUDA)"), ("op", "ok"), ("hopper_options", "ok"), ("breakdown", "ok"),
        ("end_to_end", "ok"), ("pooled_cost", "ok")]
    variants = [r["variant"] for r in payload["results"]["hopper_options"]["rows"]]
    assert "warp_specialize" in variants and all(r["status"] == "ok" for r in
                                                 payload["results"]["hopper_options"]["rows"])
    op = payload["results"]["op"]["rows"]
    from dit_sparse.backends import BACKENDS

    for row in op:
        # every registered backend but the reference has a status: timed after its check, or why it cannot run
        assert set(row["backends"]) == {n for n in BACKENDS if n != "torch"} | {"auto"}
        for name, b in row["backends"].items():
            assert b["status"] == "ok" or b["status"].startswith("cannot run: "), (name, b)
            assert (b["ms"] is not None) == (b["status"] == "ok")
        assert row["ours_backend"] and row["fastest_backend"] and row["auto_is_fastest"] is not None
        assert row["rel_err_ours"] < 1e-3
    assert any(r["pooled_ms"] for r in op), "the pooled segment is timed on sparse rows"
    rows = payload["results"]["breakdown"]["rows"]
    assert rows and {"kernel_ms", "engine_ms", "padded_tokens", "tokens"} <= set(rows[0])
    assert payload["results"]["end_to_end"]["rows"]
    summary = (tmp_path / "summary.md").read_text()
    assert "Op benchmark" in summary and "Sparse layer call" in summary and "Denoising step" in summary
    assert "Hopper kernel switches" in summary
    assert "| yes |" not in summary and "not measured" in summary
    assert (tmp_path / "suite.log").read_text().count("\n----") >= 3  # each benchmark printed its table


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


def test_op_row_is_saved_before_its_slow_tail(monkeypatch):
    """attention.py saves a row as soon as ours and the flex peer are measured (a stage killed later in the row keeps
    them), and a --budget already spent starts no row."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import attention as att
    from benchmarks._common import Shape
    from dit_sparse import TokenLayout

    monkeypatch.setattr(att, "_SMOKE", True)
    shape = Shape("t", 1, 4, 8, 1, text=4, head_dim=16)
    layout = TokenLayout(frames=1, height=4, width=8, text_tokens=4, tile=(1, 4, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, shape.tokens, 1, 16, generator=g) for _ in range(3))
    peers = att.dense_peers(q, k, v, torch.device("cpu"))
    saved = []
    with torch.no_grad():
        row = att.run_row(shape, layout, q, k, v, peers, 0.5, torch.device("cpu"), True, 1e-3, save=saved.append)
    assert len(saved) == 1 and saved[0]["partial"] is True
    assert saved[0]["ours_ms"] == row["ours_ms"] and saved[0]["flex_ms"] == row["flex_ms"]
    assert saved[0]["pooled_ms"] is None and row["pooled_ms"] is not None and "partial" not in row
    res = run("benchmarks/attention.py", "--smoke", "--budget", "0")
    assert res.returncode == 1 and "no row measured within --budget" in res.stderr


def test_targets_read_auto_and_the_fastest_backend():
    """The op targets from made-up rows: as automatic dispatch runs (``ours_ms``) and with the fastest backend."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_suite

    def row(density, auto_ms, times):
        return {"shape": "hunyuan-720p", "packing": "packed", "density_requested": density, "ours_ms": auto_ms,
                "ours_backend": "triton", "sdpa_cudnn_ms": 300.0, "flex_ms": 60.0,
                "backends": {**{n: {"status": "ok", "ms": t} for n, t in times.items()},
                             "fa4": {"status": "cannot run: x", "ms": None}, "auto": {"ms": auto_ms}}}

    results = {"op": {"rows": [row(0.1, 50.0, {"triton": 50.0, "hopper": 40.0}),
                               row(1.0, 400.0, {"triton": 400.0, "hopper": 375.0}),
                               {**row(0.1, 1.0, {"triton": 1.0}), "packing": "tiled"}]}}
    auto, best = gpu_suite.targets(results), gpu_suite.targets(results, best=True)
    assert (auto["d10_vs_cudnn"], auto["d10_vs_flex"], auto["dense_vs_cudnn"]) == (6.0, 1.2, 0.75)
    assert (best["d10_vs_cudnn"], best["d10_vs_flex"], best["dense_vs_cudnn"]) == (7.5, 1.5, 0.8)
    summary = gpu_suite.render_summary({"environment": {}, "stages": [], "results": results})
    line = next(ln for ln in summary.splitlines() if ln.startswith("| Density 0.10, vs flex"))
    assert line.split("|")[3:6] == [" 1.200 ", " no ", " 1.500 "]
    assert "{0.1: ('triton', 'hopper'), 1.0: ('triton', 'hopper')}" in summary


def test_op_stops_when_a_backend_breaks_the_cuda_context(monkeypatch, tmp_path):
    """A named-only backend (run after the rest of the row) that leaves the CUDA context unusable (simulated) stops
    the op run: the row's partial save stays in the JSON, the later rows are listed as skipped, exit 1."""
    import json

    sys.path.insert(0, str(ROOT))
    from benchmarks import attention as att

    first, named_only = att.backend_order()
    assert "hopper" in named_only and "triton" in first  # the Hopper kernel runs after the portable one
    real = att.block_sparse_attention

    def broken(*args, backend=None, **kw):
        if backend == "hopper":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(att, "block_sparse_attention", broken)
    monkeypatch.setattr(att, "_cuda_broken", lambda: True)
    assert att.main(["--smoke", "--densities", "0.5,1.0", "--out", str(tmp_path)]) == 1
    payload = json.loads(next(tmp_path.glob("attention-*.json")).read_text())
    assert [r.get("partial") for r in payload["rows"]] == [True]
    row = payload["rows"][0]
    assert row["ours_ms"] is not None and row["backends"]["hopper"]["status"].startswith("failed: RuntimeError: CUDA")
    assert payload["skipped"] == ["smoke packed density 1.0"] and "illegal memory access" in payload["stopped"]
