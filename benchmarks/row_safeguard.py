"""Which sharp-attention safeguard for the per-row remainder (issue 14 item 3): candidates measured in float64.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
