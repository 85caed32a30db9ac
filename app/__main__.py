"""``python -m app``: launch the demo on http://127.0.0.1:7860 (``--port``, ``--host``)."""

import argparse

from app.ui import launch

if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    launch(host=args.host, port=args.port, block=True)
