"""The prepared GPU suite: one command, at most 8 minutes on an H100 / H200, one output folder.

Stages (each under its own time limit; a failing or timed-out stage is recorded and the suite goes on):

1. ``tests``      — compiled (``TRITON_INTERPRET=0``; ``-n 4`` with pytest-xdist): first every ``gpu`` test
   (tests/engine/kernels and any other file that has one): real shapes of both Triton kernels, every registered
   backend against the fp32 reference (``test_backends_gpu.py``), the CUDA-graph capture of a sparse call for every
   backend that can run it (``test_cuda_graph.py``; both parametrized over ``dit_sparse.backends.BACKENDS``),
   flash-attn-4 against the reference; then, with the time left, the small kernel cases of tests/engine/kernels;
2. ``op``         — ``benchmarks/attention.py``: every registered backend of ours (checked against the fp32
   reference first; a backend that cannot run says why), automatic dispatch and whether it took the fastest, the
   row mode's pooled segment, and the peers: cuDNN / flash / efficient SDPA, xformers, flex on the same mask,
   flash-attn-4 dense and block-sparse, Sol-Attn (each where installed); packed, then tiled layouts, HunyuanVideo
   720p first, rows started only inside a time budget;
3. ``breakdown``  — ``benchmarks/layer_breakdown.py``: one sparse layer call split into plan / permute / kernel /
   epilogue / unpermute with CUDA events, and the share of the call outside the kernel;
4. ``end_to_end`` — ``benchmarks/end_to_end.py``: denoising-step speedup per preset against diffusers' masked
   dense step and against the best unmasked SDPA, and the share of the Amdahl limit;
5. ``pooled_cost`` — ``benchmarks/pooled_cost.py``: plain sparse vs block rectification vs the fused row segment
   (``row_keys`` mean / outlier) at density 0.1, HunyuanVideo 720p and Wan 480p (target: <= 5% over plain sparse).

Stages 2-5 share Triton's autotuning results (``TRITON_CACHE_AUTOTUNING=1``): the op stage tunes at model
shapes, the later stages reuse it. Writes into OUT (3 files, so that all come back from a device run):
``gpu_suite.json`` (every stage's status, log tail and the benchmarks' full JSON), ``summary.md`` (tables and the
issue's targets, each marked measured or not) and ``suite.log`` (all output).

    python benchmarks/gpu_suite.py OUT                  # on a CUDA machine
    python benchmarks/gpu_suite.py OUT --dry-run        # print the stage commands, run nothing
    python benchmarks/gpu_suite.py OUT --smoke          # CPU dry run of the pipeline (smoke modes, no numbers)

Device-run recipe (docs/testing.md#device-runs). The GPU machine has torch, triton, pytest, pytest-xdist and hypothesis
but no diffusers, flash-attn-4 or comfy-kitchen, and one call carries at most 64 MiB with the repository. On the CPU
machine, in the checkout the device calls send:

    python scripts/device_wheels.py prepare      # ~15 min once (xz); then `... commands` re-measures and prints

It downloads the pinned wheels, installs them into a staging folder (pip --target, for Python 3.12), compresses
them and splits them into the ignored folders ``.carry_a`` and ``.carry_b`` (each fits one call next to the
repository), and prints the two device commands:

* call 1, carry ``[".carry_a"]``, timeout_s 120 — copies part A to ``/tmp`` and writes a probe there:

      python3 scripts/device_wheels.py stash --carry .carry_a --stash /tmp/carry

* call 2 AT ONCE (the machine stays warm about 30 s), carry ``[".carry_b"]``, timeout_s 600 — joins, checks,
  extracts and runs this suite:

      python3 scripts/device_wheels.py unpack --carry .carry_b --stash /tmp/carry --site /tmp/site;
      export PYTHONPATH="$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages" PYTHONUNBUFFERED=1;
      python3 benchmarks/gpu_suite.py "$OUT"

  (``scripts/device_wheels.py commands`` prints both on one line each, as ``run`` takes them). If the machine went
  back between the calls, call 2 says so and runs the suite with diffusers only: the flash-attn-4 and Sol-Attn
  rows then say "not installed". The suite runs even if unpacking fails (it records what is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: the op stage's shapes and densities, most important first (the issue's targets are HunyuanVideo 720p at 0.10
#: and all-dense; the Triton autotuner tunes at the first call of a kind, here a 0.10 call at about 55 ms)
OP_ARGS = ["--shapes", "hunyuan-720p,wan2.1-480p", "--densities", "0.1,1.0", "--packing", "both"]
#: stage -> (seconds allowed, commands). ``{raw}`` is the folder the benchmarks write their JSON into,
#: ``{gpu_files}`` every test file outside tests/engine/kernels with a ``gpu`` mark, ``{xdist}`` ``-n 4`` where
#: pytest-xdist is installed (the kernel tests' compiles then run on 4 processes)
#:
#: The limits are estimates: nothing has timed the suite on a GPU yet. From the H100 results
#: (benchmarks/results/*H100*.json) and ``bench`` (a call >= 40 ms costs about 5 calls, plus one reference check):
#: op, HunyuanVideo 720p — dense peers once per shape (cuDNN 307 + flash 495 + efficient 977 ms) ~11 s, a 0.10 row
#: (four backends, auto, flex peer, pooled on two backends and auto, ~55 ms each) ~4 s, an all-dense row (~500 ms
#: each) ~18 s; Wan 480p rows take ms. The rest is compiling: an autotune key of either Triton kernel compiles its
#: 8-16 pruned configs (guessed 20-40 s), flex ~20-30 s per shape, FA4 at its first call; so the packed rows come
#: first and the tiled ones are likely cut by --budget. end_to_end (4 layers): a HunyuanVideo step ~2.2 s dense,
#: x 3 dense variants and 4 presets at ~5 calls each, plus the SDPA op timings: ~90 s with Wan.
PYTEST = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
STAGES = {
    # first every ``gpu`` test (real shapes, each backend vs the reference, CUDA graphs, flash-attn-4), then the
    # small interpreter-sized kernel cases compiled, with the time left
    "tests": (100, [[*PYTEST, "{xdist}", "-m", "gpu", "tests/engine/kernels", "{gpu_files}"],
                    [*PYTEST, "{xdist}", "-m", "not gpu", "tests/engine/kernels"]]),
    # the op script starts no new row after --budget s, so that the stage ends inside its limit with rows
    "op": (185, [[sys.executable, "benchmarks/attention.py", *OP_ARGS, "--budget", "130", "--out", "{raw}"]]),
    "breakdown": (60, [[sys.executable, "benchmarks/layer_breakdown.py", "--packing", "packed", "--out", "{raw}"]]),
    "end_to_end": (100, [[sys.executable, "benchmarks/end_to_end.py", "--layers", "4", "--out", "{raw}"]]),
    # the segment's cost: plain sparse vs block and the fused row segment at density 0.1 (two op shapes)
    "pooled_cost": (35, [[sys.executable, "benchmarks/pooled_cost.py", "{raw}"]]),
}
SMOKE = {
    "tests": (0, []),
    "op": (300, [[sys.executable, "benchmarks/attention.py", "--smoke", "--densities", "1.0,0.25",
                  "--out", "{raw}"]]),
    "breakdown": (300, [[sys.executable, "benchmarks/layer_breakdown.py", "--smoke", "--out", "{raw}"]]),
    "end_to_end": (300, [[sys.executable, "benchmarks/end_to_end.py", "--smoke", "--out", "{raw}"]]),
    "pooled_cost": (300, [[sys.executable, "benchmarks/pooled_cost.py", "--smoke"]]),
}
#: stages whose processes share Triton's autotuning results through its on-disk cache (the op stage tunes at
#: model shapes, the later stages reuse its choice instead of tuning again). Not the tests: they must not leave
#: a choice tuned on small test shapes for the benchmarks.
AUTOTUNE_CACHE_STAGES = ("op", "breakdown", "end_to_end", "pooled_cost")
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
def gpu_test_files() -> list[str]:
    """Every test file outside tests/engine/kernels that carries a ``gpu`` mark (found by its text)."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("tests/engine/kernels/") and "mark.gpu" in path.read_text():
            files.append(rel)
    return files


def expand(cmd: list[str], raw: Path | str) -> list[str] | None:
    """``cmd`` with its placeholders filled in (None: nothing to run)."""
    out = []
    for c in cmd:
        if c == "{gpu_files}":
            out += gpu_test_files()
        elif c == "{xdist}":
            out += ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []
        else:
            out.append(c.replace("{raw}", str(raw)))
    return out


def run_stage(name: str, limit: int, commands: list[list[str]], raw: Path, log, env: dict) -> dict:
    """Run a stage's commands in turn inside its time limit. A failing command is recorded and the next one still
    runs (the tests stage's second command after its first); a timeout ends the stage."""
    started = time.perf_counter()
    status, outputs, results = "ok", [], []
    if not commands:
        return {"stage": name, "status": "skipped (needs CUDA)", "seconds": 0.0, "result": "", "tail": ""}
    for cmd in commands:
        cmd = expand(cmd, raw)
        if cmd is None:
            continue
        left = limit - (time.perf_counter() - started)
        log.write(f"\n===== {name}: {' '.join(cmd)} (limit {left:.0f} s)\n")
        log.flush()
        timed_out = False
        try:
            stage_env = {**env, **({"TRITON_CACHE_AUTOTUNING": "1"} if name in AUTOTUNE_CACHE_STAGES else {})}
            res = subprocess.run(cmd, cwd=ROOT, env=stage_env, capture_output=True, text=True,
                                 timeout=max(left, 1))
            text = res.stdout + res.stderr
            if res.returncode == 5 and "pytest" in cmd:
                this = "failed (pytest collected no test)"
            else:
                this = "ok" if res.returncode == 0 else f"failed (exit {res.returncode})"
        except subprocess.TimeoutExpired as e:
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                           for x in (e.stdout, e.stderr))
            this, timed_out = f"timed out after {limit} s", True
        outputs.append(text)
        log.write(text)
        log.flush()
        counts = [ln.strip("= ") for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        results.append(counts[-1] if counts else ("" if this == "ok" else this))
        if status == "ok" and this != "ok":
            status = this
        if timed_out:
            break
    return {"stage": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
            "result": "; ".join(r for r in results if r), "tail": "".join(outputs)[-3000:]}


def _load(raw: Path, prefix: str) -> dict | None:
    files = sorted(raw.glob(f"{prefix}-*.json"))
    return json.loads(files[0].read_text()) if files else None


def _best_of_ours(row: dict) -> tuple[str | None, float | None]:
    """The fastest registered backend of an op row (checked against the reference, timed) and its time."""
    timed = {n: b["ms"] for n, b in row.get("backends", {}).items() if n != "auto" and b.get("ms")}
    if not timed:
        return None, None
    name = min(timed, key=timed.get)
    return name, timed[name]


def targets(results: dict, best: bool = False) -> dict[str, float | None]:
    """The issue's target metrics from the benchmark JSON (None where not measured). The op targets read ``ours``
    as automatic dispatch runs it, or with ``best`` the fastest registered backend (a named-only one included)."""
    got: dict[str, float | None] = {key: None for _, key, _ in TARGETS}
    op = results.get("op") or {}
    for r in op.get("rows", []):
        ours = _best_of_ours(r)[1] if best else r.get("ours_ms")
        if r.get("shape") != "hunyuan-720p" or r.get("packing") != "packed" or not ours:
            continue
        cudnn = r.get("sdpa_cudnn_ms")
        if r["density_requested"] == 1.0 and cudnn:
            got["dense_vs_cudnn"] = cudnn / ours
        if abs(r["density_requested"] - 0.1) < 1e-9:
            if cudnn:
                got["d10_vs_cudnn"] = cudnn / ours
            if r.get("flex_ms"):
                got["d10_vs_flex"] = r["flex_ms"] / ours
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
           f"Total {payload.get('seconds')} s.", "",
           "Optional packages: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in
                                             env.get("packages", {}).items()), "", "## Stages", "",
           _md_table(payload["stages"], ["stage", "status", "seconds", "result"]), ""]
    for st in payload["stages"]:
        if st["status"] not in ("ok", "skipped (needs CUDA)"):
            out += [f"{st['stage']} ({st['status']}), last lines:", "", "```", st["tail"][-1500:].strip(), "```", ""]
    res = payload.get("results", {})
    if res.get("op") and not res["op"].get("rows"):
        out += ["## Op benchmark", "", f"No row measured; not started: {res['op'].get('skipped')}; stopped: "
                f"{res['op'].get('stopped')}", ""]
    elif res.get("op"):
        rows = res["op"]["rows"]
        ours = sorted({k for r in rows for k in r if k.startswith("ours_") and k.endswith("_ms") and k != "ours_ms"})
        pooled = sorted({k for r in rows for k in r if k.startswith("pooled_") and k.endswith("_ms")
                         and k != "pooled_ms"})
        out += ["## Op benchmark (ms, median)", "",
                "`ours_<backend>_ms`: each registered backend, checked against the fp32 reference first; "
                "`ours_backend` / `ours_ms`: what automatic dispatch picks, through the public call; "
                "`pooled_*`: the same call with the row mode's pooled key segment.", "",
                # a timing column empty in every row (a peer not installed, a backend that never runs) is left
                # out; the statuses below say why
                _md_table(rows, [c for c in ["shape", "packing", "tokens", "padded_tokens", "density", "sdpa_cudnn_ms",
                                             "sdpa_flash_ms", "sdpa_efficient_ms", "sdpa_math_ms", "xformers_ms",
                                             "fa4_dense_ms", "flex_ms", "fa4_sparse_ms", "sol_attn_ms", *ours,
                                             "ours_backend", "ours_ms", "auto_is_fastest", "fastest_backend",
                                             *pooled, "pooled_backend", "pooled_ms", "speedup_vs_dense",
                                             "speedup_vs_flex", "rel_err_ours"]
                                 if not c.endswith("_ms") or any(r.get(c) is not None for r in rows)]
                         + (["partial"] if any(r.get("partial") for r in rows) else [])), ""]
        statuses: dict[str, set] = {}
        for r in rows:
            for prefix, group in (("", r.get("backends", {})), ("pooled ", r.get("pooled_backends", {}))):
                for name, b in group.items():
                    if b.get("status") != "ok":
                        statuses.setdefault(prefix + name, set()).add(b.get("status"))
        if statuses:
            out += ["Backends that did not run somewhere (row status):", ""]
            out += [f"- {name}: " + " | ".join(sorted(map(str, st))) for name, st in sorted(statuses.items())]
            out.append("")
        out += ["Peers: " + json.dumps(rows[0].get("peers", {})), ""]
        if res["op"].get("stopped"):
            out += [f"**The op run stopped early**: {res['op']['stopped']}", ""]
        if res["op"].get("skipped"):
            out += ["Rows not started (time budget, or the stop above): " + ", ".join(res["op"]["skipped"]), ""]
    if res.get("breakdown"):
        out += ["## Sparse layer call, stage by stage (ms)", "", _md_table(res["breakdown"]["rows"], [
            "shape", "preset", "packing", "padding", "density", "permute_ms", "select_ms", "plan_ms", "epilogue_ms",
            "kernel_ms", "unpermute_ms", "engine_ms", "outside_kernel_share"]), ""]
    if res.get("end_to_end"):
        out += ["## Denoising step", "", _md_table(res["end_to_end"]["rows"], [
            "model", "preset", "tokens", "padded_tokens", "attention_share", "density", "step_speedup",
            "step_speedup_vs_unmasked", "best_unmasked_backend", "amdahl_limit", "of_limit"]), ""]
    if res.get("pooled_cost"):
        out += ["## Fused pooled segment cost at density 0.1 (target: row mode <= 5% over plain sparse)",
                "", _md_table(res["pooled_cost"]["rows"], ["shape", "tokens", "density", "variant", "kernel_ms",
                                                           "kernel_overhead_pct", "build_ms"]), ""]
    got = {key: None for _, key, _ in TARGETS} if payload.get("smoke") else targets(res)
    best = {key: None for _, key, _ in TARGETS} if payload.get("smoke") else targets(res, best=True)
    names = {}
    for r in (res.get("op") or {}).get("rows", []):
        if r.get("shape") == "hunyuan-720p" and r.get("packing") == "packed":
            names[r["density_requested"]] = (r.get("ours_backend"), _best_of_ours(r)[0])
    out += ["## Op targets", "",
            "Measured = what automatic dispatch runs; the last column reads the op targets with the fastest "
            "registered backend instead (a named-only one included), for the dispatch order's next step. "
            f"HunyuanVideo 720p packed, (auto, fastest) backend by density: {names or '-'}.", "",
            "| Metric | Target | Measured | Met | Fastest backend |", "|---|---|---|---|---|"]
    for label, key, thr in TARGETS:
        v, b = got[key], best[key]
        lower_is_better = key == "outside_kernel"
        met = "not measured" if v is None else ("yes" if (v <= thr if lower_is_better else v >= thr) else "no")
        out.append(f"| {label} | {'<=' if lower_is_better else '>='} {thr} | "
                   f"{'-' if v is None else f'{v:.3f}'} | {met} | {'-' if b is None or b == v else f'{b:.3f}'} |")
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
                full = expand(cmd, "<raw>")
                shown = "(no file: skipped) " + " ".join(cmd) if full is None else " ".join(full)
                print(f"[{s}, <= {limit} s] {shown}")
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
                  "end_to_end": _load(raw, "end_to_end"), "pooled_cost": _load(raw, "pooled-cost")}
    payload = {"environment": environment(), "smoke": args.smoke, "seconds": round(time.perf_counter() - started, 1),
               "stages": results, "results": {k: v for k, v in loaded.items() if v is not None}}
    payload["targets"] = {} if args.smoke else targets(payload["results"])  # smoke numbers measure nothing
    (args.out / "gpu_suite.json").write_text(json.dumps(payload, indent=2, default=str))
    (args.out / "summary.md").write_text(render_summary(payload))
    print(render_summary(payload))
    return 0 if all(r["status"] in ("ok", "skipped (needs CUDA)") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
