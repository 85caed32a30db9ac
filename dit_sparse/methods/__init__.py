"""The four methods as sparse-plan builders, and their composition (docs/composition.md)."""

from __future__ import annotations

from .draft_attention import DraftAttentionConfig, draft_map, draft_mask, draft_plan
from .engine import DensePolicy, SparseAttention, SparseAttentionConfig, dense_attention
from .neighborhood import NeighborhoodConfig, neighborhood_attention, neighborhood_mask, neighborhood_plan
from .pooled_rectification import (
    PooledRectificationConfig,
    rectification_terms,
    rectified_attention,
    rectified_mask,
    rectified_plan,
)
from .temporal_reuse import ReuseCache, TemporalReuseConfig, TemporalReuseState, reuse_attention

__all__ = [
    "DensePolicy",
    "DraftAttentionConfig",
    "NeighborhoodConfig",
    "PooledRectificationConfig",
    "ReuseCache",
    "SparseAttention",
    "SparseAttentionConfig",
    "TemporalReuseConfig",
    "TemporalReuseState",
    "dense_attention",
    "draft_map",
    "draft_mask",
    "draft_plan",
    "neighborhood_attention",
    "neighborhood_mask",
    "neighborhood_plan",
    "rectification_terms",
    "rectified_mask",
    "rectified_attention",
    "rectified_plan",
    "reuse_attention",
]
