"""What the fused pooled-key segment (row rectification in one pass) costs over the plain sparse kernel.

Target: the remainder costs <= 5% over the plain sparse kernel at density 0.1.

* :func:`key_counts` (any machine): the analytic count per video query row at density 0.1, at the HunyuanVideo
  720p and Wan2.1 480p op shapes (packed layout, 128-token blocks): keys of the plan (kept video blocks + text, in
  block slots) against what the segment adds. The kernel walks every pooled key of the segment (``Nv`` for
  ``row_keys="mean"``, ``2 Nv`` for ``"outlier"``) in ``BLOCK_N`` chunks: one q . k dot product each (plus one q . gate
  dot each with ``"mean"``'s per-row GAPR gate), and loads and exponentiates only the ones its query block skipped.
  A count, not a time.
* :func:`run` (CUDA only): times with ``triton.testing.do_bench`` (median ms) at those shapes, bf16, a random
  per-head plan at density 0.1 (text dense): the plain sparse kernel, block rectification (the same kernel with its
  ``R``, ``c`` epilogue) and the one-pass row mode (``row_keys`` "mean" and "outlier"), each on a prebuilt plan /
  segment; and, apart, building the block epilogue and the segments from q, k, v. Writes
  ``pooled-cost-<gpu>.json`` into ``out_dir``.

* :func:`run_cpu` (``--device cpu``): the op on CPU with and without the pooled segment on the same plan (a random
  per-head plan at density 0.1, 128-token blocks, the segment of the default ``PooledRectificationConfig(
  combine="row")``: ``row_keys="outlier"``, ``row_outliers=2``, built from the statistics of the same q, k, v), fp32,
  for each ``--backends`` name (default: automatic dispatch; a backend that is not registered, or that cannot run
  the call, is skipped with its reason), at S of about 8k and 16k tokens (``--shapes``: Wan 480p geometry with 5 and
  10 latent frames; ``wan2.1-480p`` is 32k), ``--heads`` heads, next to one dense SDPA call of the same shape timed
  in the same run. Goal: the segment costs <= 10% of the sparse op at density 0.1. Writes ``pooled-cost-cpu.json``.

    python benchmarks/pooled_cost.py            # CPU: the key counts, and says the CUDA timing needs a GPU (exit 0)
    python benchmarks/pooled_cost.py OUT        # CUDA: the timing too, JSON into OUT (default benchmarks/results)
    python benchmarks/pooled_cost.py --device cpu [--backends torch,compiled] [--heads 2]   # CPU timing
    python benchmarks/pooled_cost.py --smoke    # CPU dry run of the timing code on a tiny shape (torch backend)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, SHAPES, Shape, environment, print_table, write_json  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods.base import keep_blocks  # noqa: E402

DENSITY = 0.1
COST_SHAPES = ("hunyuan-720p", "wan2.1-480p")
CUDA_ONLY = "the timing needs a CUDA GPU (triton.testing.do_bench); none is present, so nothing was timed"


def _layout(shape: Shape) -> TokenLayout:
    return TokenLayout(frames=shape.frames, height=shape.height, width=shape.width, text_tokens=shape.text)


def key_counts(density: float = DENSITY, shapes=COST_SHAPES, row_outliers=None) -> list[dict]:
    """Per video query row: plan keys vs the pooled segment's keys, for ``row_keys`` "mean" and "outlier" (with
    each ``row_outliers`` in ``row_outliers``; default: the config's default). "outlier" walks ``M + 1`` keys per
    video block (M exact + the pooled rest, no gate) and reads them for the skipped blocks."""
    from dit_sparse.methods.pooled_rectification import PooledRectificationConfig

    counts = (PooledRectificationConfig().row_outliers,) if row_outliers is None else tuple(row_outliers)
    rows = []
    for name in shapes:
        layout = _layout(SHAPES[name])
        nv, bs = layout.num_video_blocks, layout.block_size
        kept = keep_blocks(nv, 1.0 - density)
        plan_keys = (kept + layout.num_blocks - nv) * bs  # kept video blocks + every text block, in slots
        skipped = nv - kept
        variants = [("mean", None, nv, 2 * nv, skipped)]
        variants += [("outlier", m, (m + 1) * nv, (m + 1) * nv, (m + 1) * skipped) for m in counts]
        for row_keys, m, walked, dots, read in variants:
            rows.append({"shape": name, "video_blocks": nv, "kept_blocks": kept, "plan_keys": plan_keys,
                         "row_keys": row_keys, "row_outliers": m, "segment_keys": walked, "segment_dots": dots,
                         "segment_read": read, "dots_pct": round(100 * dots / plan_keys, 1),
                         "read_pct": round(100 * read / plan_keys, 1)})
    return rows


def time_variants(shapes: list[Shape], device: torch.device, backend: str, bench) -> list[dict]:
    """Kernel time of each variant on a prebuilt plan / segment, and apart the time to build them, per shape.
    ``bench(fn) -> ms``; ``backend`` of the op (``"triton"`` on CUDA; the CPU smoke run uses ``"torch"``)."""
    rows = []
    for shape in shapes:
        rows += _time_shape(shape, device, backend, bench)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _time_shape(shape: Shape, device: torch.device, backend: str, bench) -> list[dict]:
    from benchmarks.attention import random_plan
    from dit_sparse import block_sparse_attention
    from dit_sparse.methods.pooled_rectification import (
        PooledRectificationConfig,
        block_statistics,
        ipar_probabilities,
        pooled_segment,
        rectification_terms,
        row_outlier_count,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    layout = _layout(shape)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, shape.heads, shape.head_dim, generator=g, device=device,
                           dtype=dtype) for _ in range(3))
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    plan = random_plan(layout, shape.heads, DENSITY, device)
    mask = plan.to_dense()
    scale = shape.head_dim ** -0.5
    block_cfg = PooledRectificationConfig()
    row_cfgs = {"row (mean)": PooledRectificationConfig(combine="row", row_keys="mean"),
                "row (outlier)": PooledRectificationConfig(combine="row", row_keys="outlier")}

    def block_plan():
        stats = block_statistics(qp, kp, vp, layout)
        r, c = rectification_terms(qp, kp, vp, layout, mask, block_cfg, scale, stats=stats,
                                   p_tilde=ipar_probabilities(stats, scale))
        return plan.with_epilogue(out_scale=r, out_bias=c.transpose(1, 2))

    def segment(cfg):
        stats = block_statistics(qp, kp, vp, layout, deviations=cfg.row_keys == "mean",
                                 outliers=row_outlier_count(cfg))
        return pooled_segment(layout, mask, cfg, stats=stats)

    built = {"plain sparse": (plan, None), "block rectification": (block_plan(), None)}
    built.update({name: (plan, segment(cfg)) for name, cfg in row_cfgs.items()})
    builds = {"block rectification": block_plan, **{n: (lambda c=c: segment(c)) for n, c in row_cfgs.items()}}
    base = None
    for variant, (p, seg) in built.items():
        def call(p=p, seg=seg):
            return block_sparse_attention(qp, kp, vp, p, scale=scale, backend=backend, pooled=seg)

        call()
        ms = float(bench(call))
        base = ms if base is None else base
        build_ms = float(bench(builds[variant])) if variant in builds else 0.0
        rows.append({"shape": shape.name, "tokens": layout.seq_len, "heads": shape.heads,
                     "density": round(plan.density, 4), "variant": variant, "kernel_ms": ms,
                     "kernel_overhead_pct": round(100 * (ms / base - 1), 2), "build_ms": build_ms})
        print(f"{shape.name:<14} {variant:<20} kernel {ms:9.3f} ms ({rows[-1]['kernel_overhead_pct']:+.2f}%)  "
              f"build {build_ms:8.3f} ms", flush=True)
    return rows


#: CPU mode shapes: Wan 480p rows/cols with fewer latent frames (S ~ 8k, 16k)
CPU_SHAPES = {"wan-480p-5f": Shape("wan-480p-5f", 5, 30, 52, 12),
              "wan-480p-10f": Shape("wan-480p-10f", 10, 30, 52, 12), **SHAPES}


def run_cpu(shapes: list[Shape], heads: int, backends: list[str | None], rep: int = 2, out_dir=None,
            write: bool = True) -> dict:
    """The CPU mode (module docstring): per shape, dense SDPA once, then per backend the op on the same plan without
    and with the pooled segment, and the segment's build time. ``None`` in ``backends`` is automatic dispatch."""
    rows, skipped = [], []
    for shape in shapes:
        rows += _cpu_shape(shape, heads, backends, rep, skipped)
    payload = {"environment": environment(), "mode": "cpu", "density": DENSITY,
               "goal": "segment cost <= 10% of the sparse op at density 0.1", "rows": rows, "skipped": skipped}
    if write:
        payload["path"] = str(write_json("pooled-cost", payload, out_dir))
    return payload


def _cpu_shape(shape: Shape, heads: int, backends: list[str | None], rep: int, skipped: list) -> list[dict]:
    import torch.nn.functional as F

    from benchmarks._common import bench
    from benchmarks.attention import random_plan
    from dit_sparse import block_sparse_attention
    from dit_sparse.backends import BACKENDS, choose_backend
    from dit_sparse.backends.base import AttentionInputs
    from dit_sparse.methods.base import plan_from_mask
    from dit_sparse.methods.pooled_rectification import (
        PooledRectificationConfig,
        block_statistics,
        pooled_segment,
        row_outlier_count,
    )

    cfg = PooledRectificationConfig(combine="row")
    m = row_outlier_count(cfg)
    layout = _layout(shape)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, heads, shape.head_dim, generator=g) for _ in range(3))
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    plan = random_plan(layout, heads, DENSITY, "cpu")
    mask = plan.to_dense()
    scale = shape.head_dim ** -0.5

    def build():
        stats = block_statistics(qp, kp, vp, layout, deviations=False, outliers=m)
        return pooled_segment(layout, mask, cfg, stats=stats)

    seg = build()
    build_ms = float(bench(build, warmup=1, rep=rep))
    csr_ms = float(bench(lambda: plan_from_mask(mask, layout), warmup=1, rep=rep))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    dense_ms = float(bench(lambda: F.scaled_dot_product_attention(qt, kt, vt), warmup=1, rep=rep))
    base = {"shape": shape.name, "grid": [shape.frames, shape.height, shape.width], "tokens": layout.seq_len,
            "padded_tokens": layout.padded_len, "block_size": layout.block_size, "heads": heads,
            "head_dim": shape.head_dim, "dtype": "float32", "density": round(plan.density, 4),
            "row_keys": cfg.row_keys, "row_outliers": m, "segment_keys": seg.num_keys,
            "dense_sdpa_ms": dense_ms, "segment_build_ms": build_ms, "csr_build_ms": csr_ms}
    print(f"{shape.name}: {layout.seq_len} tokens ({layout.padded_len} padded), {heads} heads, density "
          f"{plan.density:.3f}, {seg.num_keys} segment keys; dense SDPA {dense_ms:.1f} ms; segment build "
          f"{build_ms:.1f} ms, CSR {csr_ms:.1f} ms", flush=True)
    rows = []
    for name in backends:
        label = name or "auto"
        if name is not None and name not in BACKENDS:
            why = f"backend {name!r} is not registered (registered: {sorted(BACKENDS)})"
            print(f"  {label}: skipped: {why}", flush=True)
            skipped.append({"shape": shape.name, "backend": label, "reason": why})
            continue
        ms, ran, why = {}, {}, {}
        for variant, pooled in (("plain", None), ("segment", seg)):
            try:  # what runs each variant (automatic dispatch may pick another backend for the segment)
                ran[variant] = choose_backend(AttentionInputs(qp, kp, vp, plan, scale, False, pooled), name).name
            except (ValueError, RuntimeError, NotImplementedError) as e:
                why[variant] = str(e)
                print(f"  {label} {variant}: skipped: {e}", flush=True)
                continue
            ms[variant] = float(bench(lambda pooled=pooled, name=name: block_sparse_attention(
                qp, kp, vp, plan, scale=scale, backend=name, pooled=pooled), warmup=1, rep=rep))
        if why:
            skipped.append({"shape": shape.name, "backend": label, "reason": why})
        if "plain" not in ms:
            continue
        both = "segment" in ms
        cost = 100.0 * (ms["segment"] / ms["plain"] - 1) if both else None
        rows.append({**base, "backend": label, "backend_run": "/".join(dict.fromkeys(ran.values())),
                     "plain_ms": ms["plain"], "segment_ms": ms.get("segment"),
                     "segment_cost_pct": None if cost is None else round(cost, 2),
                     "plain_vs_dense": ms["plain"] / dense_ms,
                     "segment_vs_dense": ms["segment"] / dense_ms if both else None,
                     "segment_build_pct_of_plain": round(100.0 * build_ms / ms["plain"], 2)})
        print(f"  {label} ({rows[-1]['backend_run']}): plain {ms['plain']:.1f} ms"
              + (f", with segment {ms['segment']:.1f} ms ({cost:+.1f}%)" if both else ", segment not run")
              + f"; plain x{ms['plain'] / dense_ms:.2f} of dense", flush=True)
    return rows


def run(out_dir=None) -> dict:
    """Time plain sparse vs block and row rectification at density 0.1 on CUDA (``triton.testing.do_bench``,
    median), JSON into ``out_dir`` (default benchmarks/results). Without CUDA: ``{"skipped": reason,
    "key_counts": ...}`` and nothing is written."""
    counts = key_counts()
    if not torch.cuda.is_available():
        return {"skipped": CUDA_ONLY, "key_counts": counts}
    from triton.testing import do_bench

    rows = time_variants([SHAPES[n] for n in COST_SHAPES], torch.device("cuda"), "triton",
                         lambda fn: do_bench(fn, return_mode="median"))
    payload = {"environment": environment(), "density": DENSITY, "rows": rows, "key_counts": counts}
    payload["path"] = str(write_json("pooled-cost", payload, out_dir))
    return payload


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", type=Path, default=RESULTS, help="folder for the JSON (CUDA only)")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run of the timing code on a tiny shape (torch "
                    "backend, perf_counter; no numbers worth reporting, nothing written)")
    ap.add_argument("--device", default=None, choices=("cpu",), help="cpu: the CPU timing mode (run_cpu)")
    ap.add_argument("--backends", default="auto", help="CPU mode: comma-separated backend names, 'auto' = automatic "
                    "dispatch (default auto; e.g. torch,compiled)")
    ap.add_argument("--shapes", default="wan-480p-5f,wan-480p-10f", help=f"CPU mode: of {sorted(CPU_SHAPES)}")
    ap.add_argument("--heads", type=int, default=2, help="CPU mode: heads")
    ap.add_argument("--rep", type=int, default=2, help="CPU mode: timed calls per variant (median)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        backends = [None if b == "auto" else b for b in args.backends.split(",")]
        shapes = [CPU_SHAPES[n] for n in args.shapes.split(",")]
        with torch.no_grad():
            result = run_cpu(shapes, args.heads, backends, args.rep, args.out)
        print()
        print_table(result["rows"], ["shape", "tokens", "heads", "density", "backend", "backend_run", "dense_sdpa_ms",
                                     "plain_ms", "segment_ms", "segment_cost_pct", "segment_build_ms"])
        print(f"\nwrote {result['path']}")
        return 0
    if args.smoke:
        from benchmarks._common import bench

        rows = time_variants([Shape("smoke", 1, 16, 16, 1, text=20, head_dim=32)], torch.device("cpu"), "torch",
                             lambda fn: bench(fn, warmup=1, rep=2))
        print_table(rows, ["shape", "variant", "kernel_ms", "kernel_overhead_pct", "build_ms"])
        return 0
    print(f"keys per video query row at density {DENSITY}: the plan's (kept video blocks + text, in 128-token slots) "
          "against the pooled segment's (dot products walked, keys read)")
    print_table(key_counts(), ["shape", "video_blocks", "kept_blocks", "plan_keys", "row_keys", "segment_dots",
                               "dots_pct", "segment_read", "read_pct"])
    result = run(args.out)
    if "skipped" in result:
        print(f"\npooled_cost: CUDA-only: {result['skipped']}; --device cpu times it on CPU.")
        return 0
    print(f"\nwrote {result['path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
