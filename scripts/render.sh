#!/usr/bin/env bash
# The README's main job: render a video on the embedded default model, offline, on CPU.
# Runs from any folder: relative paths (--jobs, --out, --model) are taken from the folder you started it in.
CALLER_DIR="$(pwd)"
source "$(dirname "$0")/_env.sh"
cd "$CALLER_DIR"
exec python -m dit_sparse.tools.cli render "$@"
