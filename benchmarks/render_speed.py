"""The README render's speed: ``dit-sparse render`` on the embedded model, its default preset vs ``--preset none``.

Runs the console script as a user types it (a subprocess from a scratch folder, each render into a fresh output
folder so nothing is resumed), ``--reps`` times each, alternating (default, none, default, none, ...), and reads the
time of each render from the sidecar JSON the CLI writes (``timings.denoise_and_decode_s``: the pipeline call,
denoising and VAE decode; model loading excluded). Reports the median per variant and their ratio (the stock
render, dense SDPA in every attention call, measured in the same run, over the sparse one), with the measured
density and the attention calls of the sparse render, the video's frames and size, and the latent token grid.
Writes ``render_speed-cpu.json``.

    python benchmarks/render_speed.py               # 3 renders each (about 3 minutes on a small CPU)
    python benchmarks/render_speed.py --reps 1 --out /tmp/x   # one each, JSON into /tmp/x
    python benchmarks/render_speed.py --smoke       # one 2-step render each, nothing written unless --out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import environment, print_table, write_json  # noqa: E402

#: the variants: name -> extra ``dit-sparse render`` arguments (the default preset is the CLI's own choice)
VARIANTS = {"default": [], "none": ["--preset", "none"]}


def console_script() -> list[str]:
    """The ``dit-sparse`` command beside this Python (the venv's console script), else ``python -m``."""
    exe = Path(sys.executable).with_name("dit-sparse")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dit_sparse.tools.cli"]


def render_once(extra: list[str], scratch: Path, index: int) -> dict:
    """One ``dit-sparse render`` (the README's command, plus ``extra``) into a fresh folder -> its sidecar JSON."""
    out = scratch / f"render-{index}"
    cmd = [*console_script(), "render", "--out", str(out), "--quiet", *extra]
    res = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    if res.returncode != 0:
        raise SystemExit(f"render_speed: {' '.join(cmd)} exited {res.returncode}:\n{res.stderr[-2000:]}")
    sidecars = [p for p in out.glob("*.json") if p.name != "run_summary.json"]
    if len(sidecars) != 1:
        raise SystemExit(f"render_speed: expected one sidecar JSON in {out}, found {[p.name for p in sidecars]}.")
    return json.loads(sidecars[0].read_text())


def grid_and_tokens(side: dict, preset: str | None) -> dict:
    """Latent token grid of the rendered video (the embedded model's rules) and the preset layout's padded tokens."""
    import dit_sparse
    from dit_sparse.tools.model_rules import read_model_rules

    grid = read_model_rules("embedded").latent_grid(side["frames"] or 1, side["height"], side["width"])
    out = {"grid": list(grid), "tokens": grid[0] * grid[1] * grid[2]}
    if preset is not None:
        out["padded_tokens"] = dit_sparse.get_preset(preset).config.layout(*grid).padded_len
    return out


def run(reps: int, extra: list[str], out_dir=None, write: bool = True) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="render_speed-"))
    try:
        sides: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        index = 0
        for i in range(reps):
            for name, args in VARIANTS.items():
                side = render_once([*args, *extra], scratch, index)
                index += 1
                sides[name].append(side)
                print(f"  {name:<8} render {i + 1}/{reps}: {side['timings']['denoise_and_decode_s']:.2f} s "
                      f"(preset {side['preset']}, density {side['measured_density']})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for name, runs in sides.items():
        times = [s["timings"]["denoise_and_decode_s"] for s in runs]
        first = runs[0]
        rows.append({"variant": name, "preset": first["preset"], "renders": len(runs),
                     "denoise_and_decode_s": statistics.median(times), "all_s": times,
                     "measured_density": first["measured_density"], "attention_calls": first["attention_calls"],
                     "steps": first["steps"], "frames": first["frames"], "height": first["height"],
                     "width": first["width"], "dtype": first["dtype"], "device": first["device"],
                     **grid_and_tokens(first, first["preset"])})
    dense = next(r for r in rows if r["variant"] == "none")["denoise_and_decode_s"]
    for r in rows:
        r["ms"] = 1e3 * r["denoise_and_decode_s"]
        r["speedup_vs_stock"] = dense / r["denoise_and_decode_s"]
    payload = {"environment": environment(), "command": "dit-sparse render --out DIR --quiet [--preset none] "
               + " ".join(extra), "timing": "timings.denoise_and_decode_s of each render's sidecar JSON (median)",
               "rows": rows}
    if write:
        payload["path"] = str(write_json("render_speed", payload, out_dir))
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="renders per variant (median; default 3)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--smoke", action="store_true", help="one 2-step render each (checks the script; nothing "
                                                         "written unless --out)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        raise SystemExit(f"--reps must be >= 1, got {args.reps}.")
    extra = ["--steps", "2"] if args.smoke else []
    result = run(1 if args.smoke else args.reps, extra, args.out, write=not args.smoke or args.out is not None)
    print()
    print_table(result["rows"], ["variant", "preset", "renders", "denoise_and_decode_s", "measured_density",
                                 "tokens", "speedup_vs_stock"])
    if "path" in result:
        print(f"\nwrote {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
