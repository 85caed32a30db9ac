"""``python -m dit_sparse.tools.app`` (or ``dit-sparse demo``): launch the demo on http://127.0.0.1:7860
(``--port``, ``--host``)."""

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dit_sparse.tools.app", description=__doc__)
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args(argv)
    from dit_sparse.tools.cli import main as cli

    return cli(["demo", "--port", str(args.port), "--share-host", args.host])  # its checks, URL and errors


if __name__ == "__main__":
    raise SystemExit(main())
