"""dit_sparse: training-free block-sparse attention for diffusion transformers in diffusers.

The core: a :class:`TokenLayout` (tile permutation of the latent grid), a :class:`SparsePlan` (which key blocks
each query block reads, plus an output correction) and one op, :func:`block_sparse_attention`.
"""

from __future__ import annotations

from .backends import use_backend
from .layout import TokenLayout, pick_tile
from .ops import block_sparse_attention, dense_attention_lse
from .plan import SparsePlan

__version__ = "0.1.0"

__all__ = [
    "SparsePlan",
    "TokenLayout",
    "block_sparse_attention",
    "dense_attention_lse",
    "pick_tile",
    "use_backend",
    "__version__",
]
