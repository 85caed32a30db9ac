"""dit_sparse: training-free block-sparse attention for diffusion transformers in diffusers.

The core: a :class:`TokenLayout` (tile permutation of the latent grid), a :class:`SparsePlan` (which key blocks
each query block reads, plus an output correction) and one op, :func:`block_sparse_attention`.
"""

from __future__ import annotations

__version__ = "0.1.0"

# every public name loads lazily (PEP 562): `import dit_sparse` imports neither torch nor diffusers, so the
# `dit-sparse` console script answers --help at once; the first use of a name imports its module
_LAZY = {
    "use_backend": "dit_sparse.backends",
    "TokenLayout": "dit_sparse.layout",
    "pick_tile": "dit_sparse.layout",
    "DensePolicy": "dit_sparse.methods",
    "DraftAttentionConfig": "dit_sparse.methods",
    "NeighborhoodConfig": "dit_sparse.methods",
    "PooledRectificationConfig": "dit_sparse.methods",
    "SparseAttention": "dit_sparse.methods",
    "SparseAttentionConfig": "dit_sparse.methods",
    "TemporalReuseConfig": "dit_sparse.methods",
    "block_sparse_attention": "dit_sparse.ops",
    "dense_attention_lse": "dit_sparse.ops",
    "SparsePlan": "dit_sparse.plan",
    "apply": "dit_sparse.integration.apply",
    "remove": "dit_sparse.integration.apply",
    "is_applied": "dit_sparse.integration.apply",
    "sparse_processors": "dit_sparse.integration.apply",
    "get_runtime": "dit_sparse.integration.apply",
    "list_presets": "dit_sparse.integration.pipelines.presets",
    "get_preset": "dit_sparse.integration.pipelines.presets",
    "load_pipeline": "dit_sparse.integration.pipelines",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dit_sparse' has no attribute {name!r}")

__all__ = ["__version__", *_LAZY]


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
