"""The prepared GPU suite (issue 15 item 4): one command, at most 8 minutes on an H100 / H200, one output folder.

Stages (each under its own time limit; a failing or timed-out stage is recorded and the suite goes on):

1. ``tests``      — the kernel tests compiled (``TRITON_INTERPRET=0``: ``tests/test_kernels``) and every test
   marked ``gpu`` (CUDA-graph capture of a sparse call included, where that test exists);
2. ``op``         — ``benchmarks/attention.py``: ours vs cuDNN / flash / efficient SDPA, xformers, flex on the same
   mask, flash-attn-4 dense and block-sparse, Sol-Attn (each where installed), packed and tiled layouts;
3. ``breakdown``  — ``benchmarks/layer_breakdown.py``: one sparse layer call split into plan / permute / kernel /
   epilogue / unpermute with CUDA events, and the share of the call outside the kernel;
4. ``end_to_end`` — ``benchmarks/end_to_end.py``: denoising-step speedup per preset against diffusers' masked
   dense step and against the best unmasked SDPA, and the share of the Amdahl limit.

Writes into OUT (at most 3 files, so that all come back from a device run): ``gpu_suite.json`` (every stage's
status, log tail and the benchmarks' full JSON), ``summary.md`` (tables and the issue's targets, each marked
measured or not) and ``suite.log`` (all output).

    python benchmarks/gpu_suite.py OUT                  # on a CUDA machine
    python benchmarks/gpu_suite.py OUT --dry-run        # print the stage commands, run nothing
    python benchmarks/gpu_suite.py OUT --smoke          # CPU dry run of the pipeline (smoke modes, no numbers)

Device-run recipe (ENVIRONMENT.md §2; the GPU machine has torch and triton but no diffusers): on the CPU machine

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata \
        hypothesis sortedcontainers attrs                  # the kernel tests use hypothesis (not on the machine)

then one device call that carries ``.whl`` and runs, with a ``timeout_s`` of about 540:

    python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl \\
      && export PYTHONPATH="$PWD/.site:$PWD" PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_suite.py "$OUT"

(flash-attn-4 and comfy-kitchen are larger than one call can carry: bring them as ENVIRONMENT.md §2 describes,
or their rows say "not installed".)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: stage -> (seconds allowed, commands); ``{raw}`` is the folder the benchmarks write their JSON into
STAGES = {
    "tests": (130, [
        [sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels"],
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests",
         "--ignore=tests/test_kernels"],
    ]),
    "op": (170, [[sys.executable, "benchmarks/attention.py", "--shapes", "hunyuan-720p,wan2.1-480p",
                  "--densities", "1.0,0.1", "--packing", "both", "--out", "{raw}"]]),
    "breakdown": (70, [[sys.executable, "benchmarks/layer_breakdown.py", "--packing", "both", "--out", "{raw}"]]),
    "end_to_end": (110, [[sys.executable, "benchmarks/end_to_end.py", "--layers", "4", "--out", "{raw}"]]),
}
SMOKE = {
    "tests": (0, []),
    "op": (300, [[sys.executable, "benchmarks/attention.py", "--smoke", "--densities", "1.0,0.25",
                  "--out", "{raw}"]]),
    "breakdown": (300, [[sys.executable, "benchmarks/layer_breakdown.py", "--smoke", "--out", "{raw}"]]),
    "end_to_end": (300, [[sys.executable, "benchmarks/end_to_end.py", "--smoke", "--out", "{raw}"]]),
}
#: the issue's targets: (label, how it is read from the results, threshold, direction)
TARGETS = [
    ("All-dense plan, vs cuDNN SDPA", "dense_vs_cudnn", 0.85),
    ("Density 0.10, vs cuDNN", "d10_vs_cudnn", 8.0),
    ("Density 0.10, vs flex on the same mask", "d10_vs_flex", 1.3),
    ("Outside the kernel in a sparse layer call at density 0.10, share of the kernel time (<=)",
     "outside_kernel", 0.10),
    ("HunyuanVideo 720p draft-90 step, share of the Amdahl limit", "hy_amdahl_share", 0.90),
    ("Wan2.1-1.3B 480p draft-80 step speedup", "wan_step", 1.35),
]


def run_stage(name: str, limit: int, commands: list[list[str]], raw: Path, log, env: dict) -> dict:
    started = time.perf_counter()
    status, outputs = "ok", []
    if not commands:
        return {"stage": name, "status": "skipped (needs CUDA)", "seconds": 0.0, "tail": ""}
    for cmd in commands:
        cmd = [c.replace("{raw}", str(raw)) for c in cmd]
        left = limit - (time.perf_counter() - started)
        log.write(f"\n===== {name}: {' '.join(cmd)} (limit {left:.0f} s)\n")
        log.flush()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(left, 1))
            outputs.append(res.stdout + res.stderr)
            log.write(res.stdout + res.stderr)
            if res.returncode != 0:
                status = f"failed (exit {res.returncode})"
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            outputs.append(text)
            log.write(text)
            status = f"timed out after {limit} s"
        log.flush()
        if status != "ok":
            break
    return {"stage": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
            "tail": "".join(outputs)[-3000:]}


def _load(raw: Path, prefix: str) -> dict | None:
    files = sorted(raw.glob(f"{prefix}-*.json"))
    return json.loads(files[0].read_text()) if files else None


def targets(results: dict) -> dict[str, float | None]:
    """The issue's target metrics from the benchmark JSON (None where not measured)."""
    got: dict[str, float | None] = {key: None for _, key, _ in TARGETS}
    op = results.get("op") or {}
    for r in op.get("rows", []):
        if r.get("shape") != "hunyuan-720p" or r.get("packing") != "packed" or not r.get("ours_ms"):
            continue
        cudnn = r.get("sdpa_cudnn_ms")
        if r["density_requested"] == 1.0 and cudnn:
            got["dense_vs_cudnn"] = cudnn / r["ours_ms"]
        if abs(r["density_requested"] - 0.1) < 1e-9:
            if cudnn:
                got["d10_vs_cudnn"] = cudnn / r["ours_ms"]
            if r.get("flex_ms"):
                got["d10_vs_flex"] = r["flex_ms"] / r["ours_ms"]
    for r in (results.get("breakdown") or {}).get("rows", []):
        if r.get("preset") == "hunyuanvideo:draft-90" and r.get("packing") == "packed":
            got["outside_kernel"] = r.get("outside_kernel_share")
    for r in (results.get("end_to_end") or {}).get("rows", []):
        if r.get("preset") == "hunyuanvideo:draft-90":
            a, d = r["attention_share"], r["density"]
            got["hy_amdahl_share"] = r["step_speedup"] * ((1 - a) + a * d)
        if r.get("preset") == "wan2.1-t2v-1.3b:draft-80":
            got["wan_step"] = r["step_speedup"]
    return got


def _md_table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def render_summary(payload: dict) -> str:
    env = payload.get("environment", {})
    out = ["# GPU suite", "", f"Machine: {env.get('gpu') or 'no GPU (smoke run: no numbers worth reporting)'}; "
           f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}. "
           f"Total {payload.get('seconds')} s.", "", "## Stages", "",
           _md_table(payload["stages"], ["stage", "status", "seconds"]), ""]
    res = payload.get("results", {})
    if res.get("op"):
        out += ["## Op benchmark (ms, median)", "", _md_table(res["op"]["rows"], [
            "shape", "packing", "tokens", "padded_tokens", "density", "sdpa_cudnn_ms", "sdpa_flash_ms",
            "sdpa_efficient_ms", "xformers_ms", "fa4_dense_ms", "flex_ms", "fa4_sparse_ms", "sol_attn_ms", "ours_ms",
            "speedup_vs_dense", "speedup_vs_flex"]), "",
            "Peers: " + json.dumps(res["op"]["rows"][0].get("peers", {})), ""]
    if res.get("breakdown"):
        out += ["## Sparse layer call, stage by stage (ms)", "", _md_table(res["breakdown"]["rows"], [
            "shape", "preset", "packing", "padding", "density", "permute_ms", "select_ms", "plan_ms", "epilogue_ms",
            "kernel_ms", "unpermute_ms", "engine_ms", "outside_kernel_share"]), ""]
    if res.get("end_to_end"):
        out += ["## Denoising step", "", _md_table(res["end_to_end"]["rows"], [
            "model", "preset", "tokens", "padded_tokens", "attention_share", "density", "step_speedup",
            "step_speedup_vs_unmasked", "best_unmasked_backend", "amdahl_limit", "of_limit"]), ""]
    got = {key: None for _, key, _ in TARGETS} if payload.get("smoke") else targets(res)
    out += ["## Issue 15 targets", "", "| Metric | Target | Measured | Met |", "|---|---|---|---|"]
    for label, key, thr in TARGETS:
        v = got[key]
        lower_is_better = key == "outside_kernel"
        met = "not measured" if v is None else ("yes" if (v <= thr if lower_is_better else v >= thr) else "no")
        out.append(f"| {label} | {'<=' if lower_is_better else '>='} {thr} | "
                   f"{'-' if v is None else f'{v:.3f}'} | {met} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (gpu_suite.json, summary.md, suite.log)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    ap.add_argument("--dry-run", action="store_true", help="print the stage commands and limits, run nothing")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: the benchmarks' --smoke modes, no tests")
    args = ap.parse_args(argv)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    table = SMOKE if args.smoke else STAGES
    if args.dry_run:
        for s in stages:
            limit, cmds = table[s]
            for cmd in cmds:
                print(f"[{s}, <= {limit} s] {' '.join(cmd)}")
        print(f"total limit {sum(table[s][0] for s in stages)} s")
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py needs a CUDA GPU; pass --smoke for a CPU dry run of the pipeline.",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "1" if args.smoke else "0", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import environment

    with tempfile.TemporaryDirectory() as tmp, open(args.out / "suite.log", "w") as log:
        raw = Path(tmp)
        results = [run_stage(s, *table[s], raw, log, env) for s in stages]
        loaded = {"op": _load(raw, "attention"), "breakdown": _load(raw, "layer_breakdown"),
                  "end_to_end": _load(raw, "end_to_end")}
    payload = {"environment": environment(), "smoke": args.smoke, "seconds": round(time.perf_counter() - started, 1),
               "stages": results, "results": {k: v for k, v in loaded.items() if v is not None}}
    payload["targets"] = {} if args.smoke else targets(payload["results"])  # smoke numbers measure nothing
    (args.out / "gpu_suite.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / "summary.md").write_text(render_summary(payload))
    print(render_summary(payload))
    return 0 if all(r["status"] in ("ok", "skipped (needs CUDA)") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
