"""Measured block density of the embedded model's presets on its own shape (issue 14 item 4).

Captures q, k of every self-attention layer of the embedded trained model (first default prompt, 10 steps, both CFG
branches, steps 1, 5 and 9), builds each ``tiny-wan:*`` preset's block mask on them and reports the mean fraction
of video x video block pairs read (sparse calls only; the dense warm-up steps are not counted). The presets'
descriptions quote these numbers.

    python benchmarks/preset_density.py          # about 1 minute on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import print_table  # noqa: E402
from benchmarks.pooled_peers import embedded_inputs  # noqa: E402
from dit_sparse.methods.composite import SparseAttention  # noqa: E402
from dit_sparse.pipelines.presets import TINY_PRESET_PREFIX, list_presets  # noqa: E402


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the capture")
    args = ap.parse_args(argv)
    calls = list(embedded_inputs(args.steps))
    rows = []
    for preset in list_presets():
        if not preset.name.startswith(TINY_PRESET_PREFIX):
            continue
        engine = SparseAttention(preset.config)
        dens = []
        for _, _, layout, (q, k, _v), scale in calls:
            qp, kp = layout.permute(q), layout.permute(k)
            mask = engine.build_mask(qp, kp, layout, scale)
            nv = layout.num_video_blocks
            dens.append(float(mask[..., :nv, :nv].float().mean()))
        rows.append({"preset": preset.name, "calls": len(dens), "density": round(sum(dens) / len(dens), 3)})
    print_table(rows, ["preset", "calls", "density"])
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    raise SystemExit(main())
