"""Fidelity harness and ablation on the embedded trained tiny model.

For each method variant and density, renders the same prompts and seeds dense and sparse and reports PSNR / SSIM
(LPIPS where its weights exist locally) of sparse vs dense, plus the mean per-layer relative L2 error of the
attention output (each sparse call is checked against the stock attention on the same q, k, v). Every step and
layer runs sparse (no dense warm-up, no dense layers): the hardest setting, so differences between methods show;
``--dense-fraction 0.2`` runs the first 20% of the steps dense in every variant (how the presets ship).

Variants (the ablation):
  top-k (oracle)       the k key blocks with the largest TRUE attention mass per query block (an upper bound for
                       selection quality; it costs a full attention map, so it is no method to ship)
  draft                DraftAttention row_topk on pooled q/k
  draft+rect           draft selection + pooled rectification epilogue (IPAR + GAPR), per query block
  draft+rect (row)     draft selection + per-row rectification (combine="row": exact read keys and, per skipped
                       block, its row_outliers most deviating keys exactly plus the mean of the rest, in one
                       softmax per query row, fused into the kernel; row_keys="outlier")
  draft+rect+reuse     ... with the plan reused for 3 steps
  neighborhood         3-D tile window with the density closest to the target

Writes benchmarks/results/fidelity-cpu.json, fidelity.md (tables) and fidelity.png (density vs PSNR); with
``--dense-fraction F`` the names carry ``-denseNN`` (fidelity-dense20-cpu.json, ...).

    python benchmarks/fidelity.py                  # about 5 minutes on 2 CPU cores (measured: 3 prompts, 20 steps)
    python benchmarks/fidelity.py --dense-fraction 0.2
    python benchmarks/fidelity.py --prompts 1 --steps 6 --densities 0.25   # quick look
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import RESULTS, environment, print_table, write_json  # noqa: E402
from dit_sparse import (  # noqa: E402
    DensePolicy,
    DraftAttentionConfig,
    NeighborhoodConfig,
    PooledRectificationConfig,
    SparseAttentionConfig,
    TemporalReuseConfig,
)
from dit_sparse.methods.base import forced_mask  # noqa: E402
from dit_sparse.methods.engine import SparseAttention  # noqa: E402
from dit_sparse.tools.metrics import compare_frames  # noqa: E402
from dit_sparse.tools.render import Job, Renderer  # noqa: E402

VARIANTS = ("top-k (oracle)", "draft", "draft+rect", "draft+rect (row)", "draft+rect+reuse", "neighborhood")
DENSITIES = (0.5, 0.25, 0.1)


class OracleTopK(SparseAttention):
    """Selects, per query block, the blocks with the largest exact attention mass (same budget as draft)."""

    def build_mask(self, q_perm, k_perm, layout, scale=None, rect_stats=None, head_offset=0, total_heads=None):
        nv, bs, n = layout.num_video_blocks, layout.block_size, layout.num_blocks
        scale = 1 / math.sqrt(q_perm.shape[-1]) if scale is None else scale
        valid = (torch.arange(layout.padded_len, device=q_perm.device) % bs) < \
            layout.block_valid(q_perm.device).repeat_interleave(bs)
        logits = torch.einsum("bshd,bthd->bhst", q_perm.float(), k_perm.float()) * scale
        p = logits.masked_fill(~valid, float("-inf")).softmax(-1)
        b, h = p.shape[:2]
        mass = p.view(b, h, n, bs, n, bs).sum(-1).sum(3)  # [B, H, N(q), N(k)]
        cfg = self.config.draft
        keep = min(nv, max(cfg.k_min, math.ceil(round((1 - cfg.sparsity) * nv, 9))))
        top = mass[..., :nv, :nv].topk(keep, dim=-1).indices
        mask = forced_mask(layout, diagonal=False, device=q_perm.device).expand(b, h, n, n).clone()
        mask[..., :nv, :nv] = False
        mask[..., :nv, :nv].scatter_(-1, top, True)
        return mask


def neighborhood_for(density: float, renderer: Renderer, base: SparseAttentionConfig) -> NeighborhoodConfig:
    """The odd tile window whose nominal density on the model's grid is closest to ``density``."""
    kw = renderer._call_kwargs(Job(prompt="x"))
    grid = renderer.latent_grid(kw)
    layout = base.layout(*grid)
    best = None
    for wt in (1, 3, 5):
        for wh in (1, 3, 5, 7):
            for ww in (1, 3, 5, 7):
                cfg = NeighborhoodConfig(window=(wt, wh, ww))
                d = cfg.nominal_density(layout)
                if best is None or abs(d - density) < best[0]:
                    best = (abs(d - density), cfg)
    return best[1]


def variant_config(name: str, density: float, renderer: Renderer, base: SparseAttentionConfig,
                   dense_fraction: float = 0.0):
    sparsity = 1 - density
    common = dict(tile=base.tile, block_size=base.block_size, dense=DensePolicy(dense_fraction=dense_fraction),
                  backend=base.backend)
    draft = DraftAttentionConfig(sparsity=sparsity)
    if name in ("top-k (oracle)", "draft"):
        return SparseAttentionConfig(draft=draft, **common)
    if name == "draft+rect":
        return SparseAttentionConfig(draft=draft, rectification=PooledRectificationConfig(), **common)
    if name == "draft+rect (row)":
        return SparseAttentionConfig(draft=draft, rectification=PooledRectificationConfig(combine="row"), **common)
    if name == "draft+rect+reuse":
        return SparseAttentionConfig(draft=draft, rectification=PooledRectificationConfig(),
                                     reuse=TemporalReuseConfig(refresh_period=3, retention=False), **common)
    if name == "neighborhood":
        return SparseAttentionConfig(neighborhood=neighborhood_for(density, renderer, base), **common)
    raise ValueError(name)


def render_variant(renderer: Renderer, job: Job, name: str, config):
    """Sparse render with per-layer error tracking; the oracle swaps in its own engine."""
    from dit_sparse.integration.apply import apply, get_runtime, remove, transformers_of

    apply(renderer.pipe, config)
    try:
        for _, tr in transformers_of(renderer.pipe):
            rt = get_runtime(tr)
            rt.track_error = True
            if name == "top-k (oracle)":
                rt.engine = OracleTopK(config)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = renderer.pipe(**renderer._call_kwargs(job))
        seconds = time.perf_counter() - t0
        rt = get_runtime(transformers_of(renderer.pipe)[0][1])
        run = rt.last_run or rt.summary()
    finally:
        remove(renderer.pipe)
    errors = run.get("layer_rel_error", {})
    return out.frames[0], seconds, run["density"], errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3, help="how many of the model's default prompts")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--dense-fraction", type=float, default=0.0,
                    help="first fraction of the steps dense in every variant (0: every step sparse)")
    args = ap.parse_args(argv)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}; expected some of {', '.join(VARIANTS)}")
    tag = "fidelity" if args.dense_fraction == 0 else f"fidelity-dense{round(args.dense_fraction * 100)}"
    from dit_sparse.integration.pipelines.presets import TINY_DEFAULT_PRESET, get_preset
    from dit_sparse.tiny.model import DEFAULT_PROMPTS

    torch.set_num_threads(max(1, torch.get_num_threads()))
    renderer = Renderer("embedded", progress=False)
    base = get_preset(TINY_DEFAULT_PRESET).config
    jobs = [Job(prompt=p, seed=s, steps=args.steps) for p in DEFAULT_PROMPTS[: args.prompts]
            for s in range(args.seeds)]
    dense = {}
    for job in jobs:
        frames, secs, _, _ = renderer.generate(job, None)
        dense[job.name] = (frames, secs)
    rows = []
    for density in (float(d) for d in args.densities.split(",")):
        for name in args.variants.split(","):
            cfg = variant_config(name, density, renderer, base, args.dense_fraction)
            per = []
            for job in jobs:
                frames, secs, achieved, errors = render_variant(renderer, job, name, cfg)
                m = compare_frames(frames, dense[job.name][0])
                per.append({**m, "seconds": secs, "density": achieved,
                            "layer_err": sum(errors.values()) / max(len(errors), 1), "errors": errors})
            row = {"variant": name, "target_density": density,
                   "density": sum(p["density"] for p in per) / len(per),
                   "psnr": sum(p["psnr"] for p in per) / len(per), "ssim": sum(p["ssim"] for p in per) / len(per),
                   "lpips": None if per[0]["lpips"] is None else sum(p["lpips"] for p in per) / len(per),
                   "layer_rel_err": sum(p["layer_err"] for p in per) / len(per),
                   "per_layer_rel_err": {k: sum(p["errors"].get(k, 0) for p in per) / len(per)
                                         for k in per[0]["errors"]},
                   "config": repr(cfg.neighborhood) if name == "neighborhood" else None}
            rows.append(row)
            print(f"density {density:<5} {name:<18} achieved {row['density']:.3f}  PSNR {row['psnr']:6.2f} dB  "
                  f"SSIM {row['ssim']:.4f}  layer err {row['layer_rel_err']:.4f}", flush=True)
    cols = ["target_density", "variant", "density", "psnr", "ssim", "layer_rel_err"]
    print()
    print_table(rows, cols)
    payload = {"environment": environment(), "model": "embedded tiny Wan (trained)",
               "prompts": [j.prompt for j in jobs], "seeds": args.seeds,
               "steps": renderer._call_kwargs(jobs[0])["num_inference_steps"], "dense_fraction": args.dense_fraction,
               "rows": rows}
    path = write_json(tag, payload)
    write_markdown(rows, RESULTS / f"{tag}.md", payload)
    plot(rows, RESULTS / f"{tag}.png", payload)
    print(f"\nwrote {path}, {RESULTS / f'{tag}.md'}, {RESULTS / f'{tag}.png'}")
    return 0


def write_markdown(rows, path: Path, payload) -> None:
    lines = [f"Embedded tiny model, {len(payload['prompts'])} prompts x {payload['seeds']} seed(s), "
             f"{payload['steps']} steps, {_schedule(payload)}. PSNR/SSIM of sparse vs dense render; "
             "layer error = mean relative L2 error of the attention output vs stock attention.", "",
             "| target density | variant | achieved density | PSNR (dB) | SSIM | layer rel. error |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target_density']} | {r['variant']} | {r['density']:.3f} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r['layer_rel_err']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def _schedule(payload) -> str:
    f = payload.get("dense_fraction", 0.0)
    return "every step and layer sparse" if not f else f"first {f:.0%} of the steps dense, the rest sparse"


def plot(rows, path: Path, payload) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["density"], r["psnr"]) for r in rows if r["variant"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("achieved density (fraction of attention computed)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(f"Embedded tiny model: quality vs density\n({_schedule(payload)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
