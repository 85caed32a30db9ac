"""Padding of the token layout at block 128 on the models' grids: tiled against packed (a count, no timing).

For each grid (latent patch tokens, text tokens in the self-attention call and their side), the tile each packing
picks, the kernel's slot count (real tokens + padding) and the padding share, and how many of the packed layout's
video blocks hold packed edge tokens. ``tests/engine/core/test_layout.py`` asserts the packed padding <= 2%.

    python benchmarks/layout_padding.py      # a second

Writes benchmarks/results/layout-padding-cpu.json (``--out DIR``: DIR/layout-padding-cpu.json).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import environment, print_table, write_json  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402

#: label -> (frames, height, width, text tokens, text side) in latent patch tokens (docs/models.md#grids)
GRIDS = {
    "Wan2.1/2.2 480p": (21, 30, 52, 0, "after"),
    "Wan2.1/2.2 720p": (21, 45, 80, 0, "after"),
    "HunyuanVideo 720p": (33, 45, 80, 256, "after"),
    "HunyuanVideo 540p": (33, 34, 60, 256, "after"),
    "CogVideoX-2B": (13, 30, 45, 226, "before"),
    "CogVideoX1.5-5B": (11, 48, 80, 226, "before"),
    "LTX-Video 704x512, 161 frames": (21, 16, 22, 0, "after"),
    "FLUX.1 1024x1024": (1, 64, 64, 512, "before"),
    "SD3 1024x1024": (1, 64, 64, 333, "after"),
}


def row(label: str) -> dict:
    frames, height, width, text, side = GRIDS[label]
    out = {"model": label, "grid": [frames, height, width], "text": text, "tokens": frames * height * width + text}
    for packing in ("tiled", "packed"):
        layout = TokenLayout(
            frames=frames, height=height, width=width, text_tokens=text, text_position=side, packing=packing
        )
        assert layout.block_size == 128, layout
        out[packing] = {
            "tile": list(layout.tile),
            "slots": layout.padded_len,
            "padding_pct": round(100 * (1 - out["tokens"] / layout.padded_len), 2),
            "video_blocks": layout.num_video_blocks,
            "packed_blocks": layout.num_packed_blocks,
        }
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON (default benchmarks/results)")
    args = ap.parse_args(argv)
    rows = [row(label) for label in GRIDS]
    flat = [
        {
            "model": r["model"],
            "tokens": r["tokens"],
            **{f"{p} {k}": r[p][k] for p in ("tiled", "packed") for k in ("tile", "slots", "padding_pct")},
            "packed blocks": f"{r['packed']['packed_blocks']} of {r['packed']['video_blocks']}",
        }
        for r in rows
    ]
    print_table(flat, list(flat[0]))
    path = write_json("layout-padding", {"environment": environment(), "block_size": 128, "rows": rows}, args.out)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
