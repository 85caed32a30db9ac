"""dit_sparse: training-free block-sparse attention for diffusion transformers in diffusers.

The core: a :class:`TokenLayout` (tile permutation of the latent grid), a :class:`SparsePlan` (which key blocks
each query block reads, plus an output correction) and one op, :func:`block_sparse_attention`.
"""

from __future__ import annotations

from .backends import use_backend
from .layout import TokenLayout, pick_tile
from .methods import (
    DensePolicy,
    DraftAttentionConfig,
    NeighborhoodConfig,
    PooledRectificationConfig,
    SparseAttention,
    SparseAttentionConfig,
    TemporalReuseConfig,
)
from .ops import block_sparse_attention, dense_attention_lse
from .plan import SparsePlan

__version__ = "0.1.0"

# diffusers-facing names load lazily: `import dit_sparse` stays light (no diffusers models, no pipelines)
_LAZY = {
    "apply": "dit_sparse.integration",
    "remove": "dit_sparse.integration",
    "is_applied": "dit_sparse.integration",
    "sparse_processors": "dit_sparse.integration",
    "get_runtime": "dit_sparse.integration",
    "list_presets": "dit_sparse.pipelines.presets",
    "get_preset": "dit_sparse.pipelines.presets",
    "load_pipeline": "dit_sparse.pipelines",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")

__all__ = [
    "DensePolicy",
    "DraftAttentionConfig",
    "NeighborhoodConfig",
    "PooledRectificationConfig",
    "SparseAttention",
    "SparseAttentionConfig",
    "TemporalReuseConfig",
    "SparsePlan",
    "TokenLayout",
    "block_sparse_attention",
    "dense_attention_lse",
    "pick_tile",
    "use_backend",
    "__version__",
    *_LAZY,
]
