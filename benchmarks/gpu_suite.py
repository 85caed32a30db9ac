"""The prepared GPU suite: one command, at most 8 minutes on an H100 / H200, one output folder.

Stages (each under its own time limit; a failing or timed-out stage is recorded and the suite goes on):

1. ``tests``      — compiled (``TRITON_INTERPRET=0``), serially (``-p no:xdist``: workers would each compile the
   same kernels again) with ``DIT_SPARSE_AUTOTUNE=quick`` (one tile config per autotune key: one compile, no
   benchmarking): first every ``gpu`` test (tests/engine/kernels and any other file that has one): real shapes of
   both Triton kernels, every registered backend against the fp32 reference (``test_backends_gpu.py``), the
   CUDA-graph capture of a sparse call for every backend that can run it (``test_cuda_graph.py``; both
   parametrized over ``dit_sparse.backends.BACKENDS``), flash-attn-4 against the reference; then, with the time
   left, the small kernel cases of tests/engine/kernels;
2. ``op``         — ``benchmarks/attention.py``: every registered backend of ours (checked against the fp32
   reference first; a backend that cannot run says why), automatic dispatch and whether it took the fastest, the
   row mode's pooled segment, and the peers: cuDNN / flash / efficient SDPA, xformers, flex on the same mask,
   flash-attn-4 dense and block-sparse, Sol-Attn (each where installed); packed, then tiled layouts, HunyuanVideo
   720p first, rows started only inside a time budget;
3. ``hopper_options`` — ``benchmarks/hopper_options.py``: the ``hopper`` backend with each ``HopperOptions``
   switch flipped against the default (warp specialisation on, the full/partial split off, rescaling at every
   step, pointer loads instead of TMA), each checked against the reference, at one tile config;
4. ``breakdown``  — ``benchmarks/layer_breakdown.py``: one sparse layer call split into plan / permute / kernel /
   epilogue / unpermute with CUDA events, and the share of the call outside the kernel;
5. ``end_to_end`` — ``benchmarks/end_to_end.py``: denoising-step speedup per preset against diffusers' masked
   dense step and against the best unmasked SDPA, and the share of the Amdahl limit;
6. ``pooled_cost`` — ``benchmarks/pooled_cost.py``: plain sparse vs block rectification vs the fused row segment
   (``row_keys`` mean / outlier) at density 0.1, HunyuanVideo 720p and Wan 480p (target: <= 5% over plain sparse).

Stages 2, 4-6 share Triton's autotuning results (``TRITON_CACHE_AUTOTUNING=1``): the op stage tunes at model
shapes, the later stages reuse it. Writes into OUT as each stage starts and ends (so a run cut at the device's
time limit returns what it measured; everything under OUT comes back from a device run): ``gpu_suite.json``
(``state``, every stage's status, log tail and the benchmarks' full JSON), ``summary.md`` (tables and the issue's
targets, each marked measured or not), ``suite.log`` (all output, streamed as it comes) and ``raw/<stage>/`` (each
benchmark's own JSON, written by the benchmark after every row). Each command runs in its own process group: a
timeout kills the group (pytest and anything it started); SIGTERM, SIGHUP or Ctrl-C kill the stage in progress,
record it as ``killed`` and write the results so far before the suite exits (128 + the signal).

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
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
#: the op stage's shapes and densities, most important first (the issue's targets are HunyuanVideo 720p at 0.10
#: and all-dense; the Triton autotuner tunes at the first call of a kind, here a 0.10 call at about 55 ms)
OP_ARGS = ["--shapes", "hunyuan-720p,wan2.1-480p", "--densities", "0.1,1.0", "--packing", "both"]
#: stage -> ``Stage(seconds allowed, commands, extra environment)``. ``{raw}`` is the folder the stage's benchmark
#: writes its JSON into (``OUT/raw/<stage>``, so that a run cut at its time limit still returns it), ``{gpu_files}``
#: every test file outside tests/engine/kernels with a ``gpu`` mark
#:
#: The limits are estimates: nothing has timed the suite on a GPU yet. From the H100 results
#: (benchmarks/results/*H100*.json) and ``bench`` (a call >= 40 ms costs about 5 calls, plus one reference check):
#: op, HunyuanVideo 720p — dense peers once per shape (cuDNN 307 + flash 495 + efficient 977 ms) ~11 s, a 0.10 row
#: (four backends, auto, flex peer, pooled on two backends and auto, ~55 ms each) ~4 s, an all-dense row (~500 ms
#: each) ~18 s; Wan 480p rows take ms. The rest is compiling: an autotune key of either Triton kernel compiles its
#: 8-16 pruned configs (guessed 20-40 s), flex ~20-30 s per shape, FA4 at its first call; so the packed rows come
#: first and the tiled ones are likely cut by --budget. end_to_end (4 layers): a HunyuanVideo step ~2.2 s dense,
#: x 3 dense variants and 4 presets at ~5 calls each, plus the SDPA op timings: ~90 s with Wan.
#: The tests run serially (no pytest-xdist: 4 workers would each compile every kernel config and FA4 kernel again)
#: with ``DIT_SPARSE_AUTOTUNE=quick`` (one tile config per autotune key: one compile, nothing benchmarked); a
#: timeout kills the stage's whole process group.
PYTEST = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist"]


class Stage(NamedTuple):
    limit: int  #: seconds for all of the stage's commands
    commands: list  #: argv lists, run in turn
    env: dict = {}  #: extra environment of the stage's processes


#: the test stage's environment: one autotune config per key (the kernels' prune reads it)
TEST_ENV = {"DIT_SPARSE_AUTOTUNE": "quick"}
STAGES = {
    # first every ``gpu`` test (real shapes, each backend vs the reference, CUDA graphs, flash-attn-4), then the
    # small interpreter-sized kernel cases compiled, with the time left
    "tests": Stage(100, [[*PYTEST, "-m", "gpu", "tests/engine/kernels", "{gpu_files}"],
                         [*PYTEST, "-m", "not gpu", "tests/engine/kernels"]], TEST_ENV),
    # the op script starts no new row after --budget s, so that the stage ends inside its limit with rows
    "op": Stage(170, [[sys.executable, "benchmarks/attention.py", *OP_ARGS, "--budget", "115", "--out", "{raw}"]]),
    # the Hopper kernel's switches (warp specialisation, split, rescaling, TMA) each against the default, at one
    # tile config each (``quick``: the comparison is of the switch, and one compile per variant)
    "hopper_options": Stage(30, [[sys.executable, "benchmarks/hopper_options.py", "--out", "{raw}"]],
                            {"DIT_SPARSE_AUTOTUNE": "quick"}),
    "breakdown": Stage(60, [[sys.executable, "benchmarks/layer_breakdown.py", "--packing", "packed", "--out",
                             "{raw}"]]),
    "end_to_end": Stage(85, [[sys.executable, "benchmarks/end_to_end.py", "--layers", "4", "--out", "{raw}"]]),
    # the segment's cost: plain sparse vs block and the fused row segment at density 0.1 (two op shapes)
    "pooled_cost": Stage(35, [[sys.executable, "benchmarks/pooled_cost.py", "{raw}"]]),
}
SMOKE = {
    "tests": Stage(0, []),
    "op": Stage(300, [[sys.executable, "benchmarks/attention.py", "--smoke", "--densities", "1.0,0.25",
                       "--out", "{raw}"]]),
    "hopper_options": Stage(300, [[sys.executable, "benchmarks/hopper_options.py", "--smoke", "--out", "{raw}"]]),
    "breakdown": Stage(300, [[sys.executable, "benchmarks/layer_breakdown.py", "--smoke", "--out", "{raw}"]]),
    "end_to_end": Stage(300, [[sys.executable, "benchmarks/end_to_end.py", "--smoke", "--out", "{raw}"]]),
    "pooled_cost": Stage(300, [[sys.executable, "benchmarks/pooled_cost.py", "--smoke"]]),
}
#: each stage's benchmark JSON: ``OUT/raw/<stage>/<prefix>-<gpu>.json``
RESULT_PREFIX = {"op": "attention", "hopper_options": "hopper_options", "breakdown": "layer_breakdown",
                 "end_to_end": "end_to_end", "pooled_cost": "pooled-cost"}
#: stages whose processes share Triton's autotuning results through its on-disk cache (the op stage tunes at
#: model shapes, the later stages reuse its choice instead of tuning again). Not the tests: they must not leave
#: a choice tuned on small test shapes for the benchmarks.
AUTOTUNE_CACHE_STAGES = ("op", "breakdown", "end_to_end", "pooled_cost")
#: the suite's own files in OUT (next to ``raw/``)
SUITE_FILES = ("gpu_suite.json", "summary.md", "suite.log")
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


def expand(cmd: list[str], raw: Path | str) -> list[str]:
    """``cmd`` with its placeholders filled in."""
    out = []
    for c in cmd:
        if c == "{gpu_files}":
            out += gpu_test_files()
        else:
            out.append(c.replace("{raw}", str(raw)))
    return out


class Stopped(Exception):
    """The suite got a termination signal (the device's time limit): the stage in progress is killed and
    recorded, the results so far written, the suite exits."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole process group (pytest and any worker it started, a benchmark and its compile
    workers), then reap ``proc``. A group already gone is fine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _die_with_parent() -> None:
    """In the stage's process, before exec: SIGKILL it when the suite dies (Linux ``PR_SET_PDEATHSIG``), so that a
    suite killed outright (SIGKILL: nothing to catch) leaves no stage holding the GPU. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            pass


def run_command(cmd: list[str], env: dict, timeout: float, log_path: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group (``start_new_session``) with stdout and stderr streamed into
    ``log_path`` as they come (a cut run keeps them). Returns ``(exit code, its output)``; on timeout the whole
    group is killed and the exit code is None. Whatever the outcome, no process of the group outlives the call
    (a leftover holds the GPU). :class:`Stopped` raised while waiting kills the group too; a suite killed outright
    takes the command's own process with it (``_die_with_parent``)."""
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)

    def output() -> str:
        with open(log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    except Stopped as e:
        kill_group(proc)
        e.output = output()
        raise
    finally:
        kill_group(proc)  # the leader is done or killed: its workers go with it
    return rc, output()


def _log(log_path: Path, text: str) -> None:
    with open(log_path, "a") as log:
        log.write(text)


def run_stage(name: str, stage: Stage, raw: Path, log_path: Path, env: dict) -> dict:
    """Run a stage's commands in turn inside its time limit, their output streamed into ``log_path``. A failing
    command is recorded and the next one still runs (the tests stage's second command after its first); a timeout
    ends the stage. On :class:`Stopped` the record says ``killed`` and travels with the exception (``e.record``)."""
    started = time.perf_counter()
    status, outputs, results = "ok", [], []
    if not stage.commands:
        return {"stage": name, "status": "skipped (needs CUDA)", "seconds": 0.0, "result": "", "tail": ""}
    raw.mkdir(parents=True, exist_ok=True)
    stage_env = {**env, **stage.env, **({"TRITON_CACHE_AUTOTUNING": "1"} if name in AUTOTUNE_CACHE_STAGES else {})}

    def record():
        return {"stage": name, "status": status, "seconds": round(time.perf_counter() - started, 1),
                "result": "; ".join(r for r in results if r), "tail": "".join(outputs)[-3000:]}

    for cmd in stage.commands:
        cmd = expand(cmd, raw)
        left = stage.limit - (time.perf_counter() - started)
        extra = "".join(f"{k}={v} " for k, v in stage.env.items())
        _log(log_path, f"\n===== {name}: {extra}{' '.join(cmd)} (limit {left:.0f} s)\n")
        try:
            rc, text = run_command(cmd, stage_env, max(left, 1), log_path)
        except Stopped as e:
            outputs.append(getattr(e, "output", ""))
            status = f"killed ({e}) after {time.perf_counter() - started:.0f} s"
            e.record = record()
            raise
        outputs.append(text)
        if rc is None:
            this = f"timed out after {stage.limit} s"
        elif rc == 5 and "pytest" in cmd:
            this = "failed (pytest collected no test)"
        else:
            this = "ok" if rc == 0 else f"failed (exit {rc})"
        counts = [ln.strip("= ") for ln in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
        results.append(counts[-1] if counts else ("" if this == "ok" else this))
        if status == "ok" and this != "ok":
            status = this
        if rc is None:
            break
    return record()


def _load(raw: Path, prefix: str) -> dict | None:
    files = sorted(raw.glob(f"{prefix}-*.json"))
    return json.loads(files[0].read_text()) if files else None


def load_results(raw_root: Path) -> dict:
    """Every stage's benchmark JSON found under ``raw_root`` (``raw/<stage>/``), by stage."""
    loaded = {st: _load(raw_root / st, prefix) for st, prefix in RESULT_PREFIX.items()}
    return {k: v for k, v in loaded.items() if v is not None}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out: Path, *, environment: dict, smoke: bool, started: float, stages: list[dict],
                  state: str) -> dict:
    """``gpu_suite.json`` and ``summary.md`` from the stages so far and the JSON under ``out/raw`` (atomic: a run
    cut at any moment leaves the last complete pair). ``state``: ``running <stage>``, ``finished`` or
    ``killed (<signal>)``."""
    payload = {"environment": environment, "smoke": smoke, "state": state,
               "seconds": round(time.perf_counter() - started, 1), "stages": stages,
               "results": load_results(out / "raw")}
    payload["targets"] = {} if smoke else targets(payload["results"])  # smoke numbers measure nothing
    summary = render_summary(payload)
    _write_atomic(out / "gpu_suite.json", json.dumps(payload, indent=2, default=str))
    _write_atomic(out / "summary.md", summary)
    return payload


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
    if res.get("hopper_options"):
        ho = res["hopper_options"]
        out += ["## Hopper kernel switches (ms; `vs_default` > 1: the switch helps)", "",
                f"`hopper` backend, each `HopperOptions` switch flipped against the default; autotune "
                f"`{ho.get('autotune')}` (`quick`: one tile config for every variant).", "",
                _md_table(ho["rows"], ["shape", "density", "variant", "status", "ms", "vs_default", "rel_err"]), ""]
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


def main(argv=None, table: dict[str, Stage] | None = None) -> int:
    """The suite. ``table`` replaces the stage table (tests of the machinery: cheap stand-in stages)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="output folder (gpu_suite.json, summary.md, suite.log, raw/<stage>/)")
    ap.add_argument("--stages", default=None, help="comma list of " + ", ".join(STAGES))
    ap.add_argument("--dry-run", action="store_true", help="print the stage commands and limits, run nothing")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: the benchmarks' --smoke modes, no tests")
    args = ap.parse_args(argv)
    if table is None:
        table = SMOKE if args.smoke else STAGES
    stages = args.stages.split(",") if args.stages else list(table)
    unknown = [s for s in stages if s not in table]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; choose from {list(table)}")
    if args.dry_run:
        for s in stages:
            stage = table[s]
            extra = "".join(f"{k}={v} " for k, v in stage.env.items())
            for cmd in stage.commands:
                print(f"[{s}, <= {stage.limit} s] {extra}{' '.join(expand(cmd, '<raw>'))}")
        print(f"total limit {sum(table[s].limit for s in stages)} s")
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu_suite.py needs a CUDA GPU; pass --smoke for a CPU dry run of the pipeline.",
              file=sys.stderr)
        return 2
    out = args.out
    stale = [p.name for p in (out.iterdir() if out.is_dir() else []) if p.name in (*SUITE_FILES, "raw")]
    if stale:
        print(f"benchmarks/gpu_suite.py: {out} already holds an earlier run ({', '.join(sorted(stale))}); pass a new "
              "or empty folder (the stage JSON would mix).", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TRITON_INTERPRET": "1" if args.smoke else "0", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from benchmarks._common import environment

    machine = environment()
    log_path = out / "suite.log"
    log_path.touch()
    results: list[dict] = []

    def stop(signum, frame):
        raise Stopped(signum)

    # the device's time limit sends SIGTERM to the suite's process group (the stage's own group is ours to kill)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    state = "finished"
    try:
        for s in stages:
            write_outputs(out, environment=machine, smoke=args.smoke, started=started, state=f"running {s}",
                          stages=results + [{"stage": s, "status": "running", "seconds": None, "result": "",
                                             "tail": ""}])
            results.append(run_stage(s, table[s], out / "raw" / s, log_path, env))
            write_outputs(out, environment=machine, smoke=args.smoke, started=started, stages=results,
                          state=f"{s} done")
    except Stopped as e:
        results.append(getattr(e, "record", None) or {"stage": "-", "status": f"killed ({e})", "seconds": None,
                                                      "result": "", "tail": ""})
        state = f"killed ({e})"
        write_outputs(out, environment=machine, smoke=args.smoke, started=started, stages=results, state=state)
        _log(log_path, f"\n===== suite killed ({e}); results so far in gpu_suite.json\n")
        print(f"benchmarks/gpu_suite.py: killed ({e}); results so far in {out / 'gpu_suite.json'}", file=sys.stderr)
        return 128 + e.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    payload = write_outputs(out, environment=machine, smoke=args.smoke, started=started, stages=results,
                            state=state)
    print(render_summary(payload))
    return 0 if all(r["status"] in ("ok", "skipped (needs CUDA)") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
