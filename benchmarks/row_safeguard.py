"""Which sharp-attention safeguard for the per-row remainder: candidates measured in float64.

Dense float64 formulas (no kernel): for each structured family (``tests/utils.py::structured_family``), seed and
draft density, the relative L2 error vs dense attention of draft alone and of draft + a per-row remainder built in
different ways, as the WORST head's error divided by draft alone's (the "never worse than draft" target is <= 1):

  gapr      one mean key per skipped block (weight n_j), GAPR per row |q·k̄| > |q·b|   (row_keys="mean")
  naive     the same without the gate
  2nd       + the second-order logit ½ s² Σ_d q_d² Var_j(k_d) (exact for Gaussian keys), with GAPR
  split     the block's most deviating key exactly + the mean of the other n_j - 1        (row_keys="outlier")
  splitg    split, with GAPR on the rest key
  blk1      drop the remainder of a block whose outlier's centroid logit exceeds the mean's by > 1 (GAPR-like
            "fall back to plain sparse for that block"); blk1g: the same with GAPR
  rowfb1    no remainder at all for a query block if any skipped block fails blk1

    python benchmarks/row_safeguard.py            # 4x32x32 grid, 64-token tiles; about 3 minutes on 2 CPU cores
    python benchmarks/row_safeguard.py --small    # 2x16x16 grid, 16-token tiles

``--outliers`` (how many exact keys per skipped block, ``PooledRectificationConfig.row_outliers``): the library's
own row mode (torch backend, float32) with ``row_keys="outlier"`` and ``row_outliers`` 1, 2, 3 against draft alone
(the selection, no compensation) and against ``row_keys="mean"``, on the same mask, for

* the three structured families (2 heads of dim 128, 2 seeds) at 16-token blocks (4 x 32 x 32 grid, tile 1x4x4,
  256 blocks) and at 128-token blocks (5 x 30 x 52 grid, the real-model presets' tile, 61 blocks), and
* the embedded model's captured attention (every self-attention layer at three steps of one prompt, 16-token
  blocks, 20 blocks),

under three selections: draft at density 0.1 (``floor(0.1 Nv)`` blocks per row, no sink), and the own selections of
the presets ``wan2.1-t2v-1.3b:draft-90-rect`` and ``hunyuanvideo:rectified-90``. Also the pooled key count per
query row (``benchmarks/pooled_cost.py::key_counts``). Writes benchmarks/results/row-outliers-cpu.json and
row-outliers.md.

    python benchmarks/row_safeguard.py --outliers             # about 10 minutes on 2 CPU cores
    python benchmarks/row_safeguard.py --outliers --smoke     # tiny dry run, nothing written
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from utils import FAMILIES, structured_family  # noqa: E402

from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods.draft_attention import DraftAttentionConfig, draft_mask  # noqa: E402

H, D = 2, 32


def errors(layout: TokenLayout, family: str, seed: int, sparsity: float) -> dict[str, float]:
    nv, bs = layout.num_video_blocks, layout.block_size
    q, k, v = structured_family(layout, family, heads=H, dim=D, seed=seed)
    qp, kp, vp = (layout.permute(t)[0].transpose(0, 1) for t in (q, k, v))  # [H, P, D] float64
    s = 1 / math.sqrt(D)
    mask = draft_mask(layout.permute(q.float()), layout.permute(k.float()), layout,
                      DraftAttentionConfig(sparsity=sparsity, sink=False, k_min=1))[0]
    mask = mask.expand(H, -1, -1)[:, :nv, :nv]
    logits = qp @ kp.transpose(-1, -2) * s
    dense = torch.softmax(logits, -1) @ vp
    sel = mask.repeat_interleave(bs, 1).repeat_interleave(bs, 2)
    exact = logits.masked_fill(~sel, -math.inf)
    kb, vb = kp.reshape(H, nv, bs, D), vp.reshape(H, nv, bs, D)
    km, vm = kb.mean(2), vb.mean(2)
    kdev = (kb - km[:, :, None]).abs().mean(2)
    kvar = kb.var(2, unbiased=False)
    dots = qp @ km.transpose(-1, -2)
    skipped = ~mask.repeat_interleave(bs, 1)
    gapr = dots.abs() > (qp @ kdev.transpose(-1, -2)).abs()
    t = (kb - km[:, :, None]).norm(dim=-1).argmax(-1)
    kout = kb.gather(2, t[..., None, None].expand(H, nv, 1, D))[:, :, 0]
    vout = vb.gather(2, t[..., None, None].expand(H, nv, 1, D))[:, :, 0]
    krest, vrest = (bs * km - kout) / (bs - 1), (bs * vm - vout) / (bs - 1)
    lift = s * (qp.reshape(H, nv, bs, D).mean(2) @ (kout - km).transpose(-1, -2))  # [H, i, j]

    def combine(cols):
        ls, vs = [exact], [vp]
        for logit, ok, val in cols:
            ls.append(logit.masked_fill(~(ok & skipped), -math.inf))
            vs.append(val)
        return torch.softmax(torch.cat(ls, -1), -1) @ torch.cat(vs, 1)

    def err(o):  # the worst head
        return max(float((o[h] - dense[h]).norm() / dense[h].norm()) for h in range(H))

    base = dots * s + math.log(bs)
    ones = torch.ones_like(gapr)
    rest = qp @ krest.transpose(-1, -2)
    gapr_rest = rest.abs() > (qp @ kdev.transpose(-1, -2)).abs()
    outlier = (qp @ kout.transpose(-1, -2) * s, ones, vout)
    keep_blk = (lift <= 1.0).repeat_interleave(bs, 1)
    bad_row = ((lift > 1.0) & ~mask).any(-1, keepdim=True).repeat_interleave(bs, 1)
    return {
        "draft": err(torch.softmax(exact, -1) @ vp),
        "gapr": err(combine([(base, gapr, vm)])),
        "naive": err(combine([(base, ones, vm)])),
        "2nd": err(combine([(base + 0.5 * s * s * ((qp * qp) @ kvar.transpose(-1, -2)), gapr, vm)])),
        "split": err(combine([outlier, (rest * s + math.log(bs - 1), ones, vrest)])),
        "splitg": err(combine([outlier, (rest * s + math.log(bs - 1), gapr_rest, vrest)])),
        "blk1": err(combine([(base, keep_blk, vm)])),
        "blk1g": err(combine([(base, gapr & keep_blk, vm)])),
        "rowfb1": err(combine([(base, ~bad_row, vm)])),
    }


# ---------------------------------------------------------------------------------------------------- --outliers
OUTLIER_COUNTS = (1, 2, 3)
OUTLIER_METHODS = ("draft", "mean") + tuple(f"outlier{m}" for m in OUTLIER_COUNTS)
#: preset selections measured (their selection only; the compensation is what varies)
OUTLIER_PRESETS = ("wan2.1-t2v-1.3b:draft-90-rect", "hunyuanvideo:rectified-90")


def _selection_mask(name: str, qp, kp, layout: TokenLayout, scale: float):
    """The block mask of one selection on permuted float32 inputs."""
    from dit_sparse.integration.pipelines.presets import get_preset
    from dit_sparse.methods.engine import SparseAttention

    nv = layout.num_video_blocks
    if name == "draft 0.1":
        budget = max(1, math.floor(0.1 * nv + 1e-9))
        return draft_mask(qp, kp, layout, DraftAttentionConfig(sparsity=1.0 - budget / nv, sink=False, k_min=1),
                          scale)
    return SparseAttention(get_preset(name).config).build_mask(qp, kp, layout, scale)


def outlier_errors(q, k, v, layout: TokenLayout, selection: str, scale: float) -> dict:
    """Relative L2 errors vs dense (whole output, and the worst head) of draft alone, row "mean" and row "outlier"
    with 1, 2, 3 exact keys per skipped block, all on one mask."""
    import dataclasses

    from dit_sparse.methods.base import plan_from_mask
    from dit_sparse.methods.pooled_rectification import PooledRectificationConfig, rectified_attention
    from dit_sparse.ops import block_sparse_attention

    qp, kp, vp = (layout.permute(t.float()) for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)),
                                                             scale=scale).transpose(1, 2).double()
    mask = _selection_mask(selection, qp, kp, layout, scale)
    nv = layout.num_video_blocks
    outs = {"draft": block_sparse_attention(qp, kp, vp, plan_from_mask(mask, layout), scale=scale, backend="torch")}
    row = PooledRectificationConfig(combine="row")
    for name, cfg in [("mean", dataclasses.replace(row, row_keys="mean"))] + [
            (f"outlier{m}", dataclasses.replace(row, row_keys="outlier", row_outliers=m)) for m in OUTLIER_COUNTS]:
        outs[name] = rectified_attention(qp, kp, vp, layout, cfg, scale, mask=mask, backend="torch")
    res = {"density": float(mask[..., :nv, :nv].float().mean())}
    for name, o in outs.items():
        o = layout.unpermute(o).double()
        res[name] = float((o - dense).norm() / dense.norm())
        res[name + " per head"] = [float((o[:, :, h] - dense[:, :, h]).norm() / dense[:, :, h].norm())
                                   for h in range(o.shape[2])]
    return res


def outlier_inputs(smoke: bool, seeds: int, steps: int):
    """(source, case, layout, (q, k, v), scale) for the families at blocks 16 and 128 and the embedded capture."""
    from benchmarks.pooled_peers import embedded_inputs, family_inputs

    if smoke:
        lays = {"16": TokenLayout(frames=1, height=16, width=16, tile=(1, 4, 4)),
                "128": TokenLayout(frames=2, height=16, width=32, block_size=128)}
    else:
        lays = {"16": TokenLayout(frames=4, height=32, width=32, tile=(1, 4, 4)),
                "128": TokenLayout(frames=5, height=30, width=52)}
    for block, lay in lays.items():
        for family, case, layout, qkv, scale in family_inputs(seeds, lay, dim=32 if smoke else 128):
            yield f"{family} @{block}", case, layout, qkv, scale
    if not smoke:
        yield from embedded_inputs(steps)


def run_outliers(smoke: bool = False, seeds: int = 2, steps: int = 10) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.pooled_cost import key_counts

    selections = ("draft 0.1",) + OUTLIER_PRESETS
    rows = []
    for source, case, layout, (q, k, v), scale in outlier_inputs(smoke, seeds, steps):
        for sel in selections:
            r = outlier_errors(q, k, v, layout, sel, scale)
            rows.append({"selection": sel, "source": source, "case": case, "block_size": layout.block_size, **r})
            print(f"{sel:<32} {source:<22} {case:<22} density {r['density']:.3f} " + " ".join(
                f"{m}={r[m]:.4f}" for m in OUTLIER_METHODS), flush=True)
    summary = []
    for sel in selections:
        for source in dict.fromkeys(r["source"] for r in rows):
            cell = [r for r in rows if r["selection"] == sel and r["source"] == source]
            s = {"selection": sel, "source": source, "cases": len(cell),
                 "density": round(sum(r["density"] for r in cell) / len(cell), 3)}
            for m in OUTLIER_METHODS:
                s[m] = round(sum(r[m] for r in cell) / len(cell), 4)
            for m in OUTLIER_METHODS[1:]:
                s[f"{m}/draft"] = round(s[m] / s["draft"], 3)
                # worst over cases and heads: each head's error over draft alone's on the same head and case
                ratios = [[a / b for a, b in zip(r[m + " per head"], r["draft per head"])] for r in cell]
                s[f"{m} worst/draft"] = round(max(max(x) for x in ratios), 3)
                s[f"{m} > draft (cases)"] = sum(r[m] > r["draft"] or max(x) > 1 for r, x in zip(cell, ratios))
            summary.append(s)
    verdict = {}
    for m in OUTLIER_METHODS[1:]:
        verdict[m] = {"cases_worse_than_draft": sum(s[f"{m} > draft (cases)"] for s in summary),
                      "worst_ratio": max(s[f"{m} worst/draft"] for s in summary),
                      "mean_ratio_max_over_cells": max(s[f"{m}/draft"] for s in summary),
                      "mean_ratio_draft01_max": max(s[f"{m}/draft"] for s in summary if s["selection"] == "draft 0.1")}
    meets = [m for m in OUTLIER_COUNTS if verdict[f"outlier{m}"]["cases_worse_than_draft"] == 0]
    costs = [r for r in key_counts(row_outliers=OUTLIER_COUNTS)]
    return {"rows": rows, "summary": summary, "verdict": verdict,
            "smallest_row_outliers_never_worse": meets[0] if meets else None, "key_counts": costs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--outliers", action="store_true", help="row_outliers 1, 2, 3 vs draft alone and row 'mean' "
                    "(see the module docstring)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the embedded capture (--outliers)")
    ap.add_argument("--smoke", action="store_true", help="with --outliers: tiny grids, one seed, no embedded "
                    "capture, nothing written")
    args = ap.parse_args(argv)
    if args.outliers:
        return _main_outliers(args)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    layout = (TokenLayout(frames=2, height=16, width=16, tile=(1, 4, 4)) if args.small
              else TokenLayout(frames=4, height=32, width=32, tile=(1, 8, 8)))
    ratios: dict[str, list[float]] = {}
    for sparsity in (0.9, 0.75):
        for family in FAMILIES:
            for seed in range(args.seeds):
                r = errors(layout, family, seed, sparsity)
                cells = " ".join(f"{k}={v:.3f}" for k, v in r.items())
                print(f"sparsity {sparsity} {family:<12} seed {seed} {cells}", flush=True)
                for name, e in r.items():
                    ratios.setdefault(name, []).append(e / r["draft"])
    print("\nworst-head error / draft alone's, over families, seeds and densities")
    print("worst: " + " ".join(f"{k}={max(v):.2f}" for k, v in ratios.items()))
    print("mean:  " + " ".join(f"{k}={sum(v) / len(v):.2f}" for k, v in ratios.items()))
    return 0


def _main_outliers(args) -> int:
    from benchmarks._common import RESULTS, environment, print_table, write_json

    result = run_outliers(smoke=args.smoke, seeds=1 if args.smoke else args.seeds, steps=args.steps)
    cols = ["selection", "source", "cases", "density"] + list(OUTLIER_METHODS) + [
        f"{m}/draft" for m in OUTLIER_METHODS[1:]] + [f"{m} worst/draft" for m in OUTLIER_METHODS[1:]]
    print()
    print_table(result["summary"], cols)
    print()
    print_table(result["key_counts"], list(result["key_counts"][0]))
    for m, v in result["verdict"].items():
        print(f"{m}: {v}")
    print(f"smallest row_outliers never worse than draft alone: {result['smallest_row_outliers_never_worse']}")
    if args.smoke:
        return 0
    path = write_json("row-outliers", {"environment": environment(), **result})
    lines = ["Row mode with 1-3 exact keys per skipped block (`row_outliers`) vs draft alone and one mean key, on the "
             "same mask: relative L2 error vs dense (mean over cases), the ratio of means to draft's, and the worst "
             "ratio to draft over cases and heads (each head against draft on the same head); 2-core CPU, float32 "
             "(`python benchmarks/row_safeguard.py --outliers`).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s[c]) for c in cols) + " |" for s in result["summary"]]
    (RESULTS / "row-outliers.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {path}, {RESULTS / 'row-outliers.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
