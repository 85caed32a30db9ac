# Sourced by the set-up scripts: make .venv (torch pinned first, CPU wheel) and install dit_sparse into it.
# Re-running is cheap: the install is skipped while pyproject.toml and this file are unchanged.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.dit_sparse-installed"
WANT="$(cat pyproject.toml scripts/_env.sh | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo ">> installing into .venv (torch CPU wheel first, then dit_sparse[dev,triton,app,ray,peers], NATTEN)" >&2
    python -m pip install -q --disable-pip-version-check "torch==${DIT_SPARSE_TORCH:-2.13.0}" 2>&1 | grep -v "is ignored" >&2 || true
    python -m pip install -q --disable-pip-version-check -e ".[dev,triton,app,ray,peers]" 2>&1 | grep -v "is ignored" >&2 || true
    # NATTEN, the neighbourhood oracle: built against the torch above (seconds without CUDA), so no build isolation
    # (which would fetch another torch) and no dependencies
    python -m pip install -q --disable-pip-version-check "setuptools>=64" 2>&1 | grep -v "is ignored" >&2 || true
    python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps "natten==0.21.7" 2>&1 \
        | grep -v "is ignored" >&2 || true
    python -c "import torch, diffusers, dit_sparse, comfy_kitchen, natten, flash_attn.cute" >&2
    echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False
