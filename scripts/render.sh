#!/usr/bin/env bash
# The README's main job: render a video on the embedded default model, offline, on CPU.
source "$(dirname "$0")/_env.sh"
exec python -m dit_sparse.cli render "$@"
