"""``dit-sparse`` command line (batch render CLI: not implemented yet)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dit-sparse", description=__doc__)
    parser.add_argument("command", nargs="?", default="render", choices=["render"])
    parser.parse_known_args(argv)
    print("dit-sparse render: not yet — the batch render CLI is tracked in the issue "
          "'Batch render CLI and Gradio demo'. The core engine (SparsePlan, TokenLayout, "
          "block_sparse_attention) is usable from Python today.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
