"""Every field of every user-facing config is checked when the config is built, and the error
names the field, what was got and what is expected (and, for the composite config, the fix)."""

from __future__ import annotations

import math

import pytest
import torch

from dit_sparse import TokenLayout
from dit_sparse.methods.draft_attention import DraftAttentionConfig
from dit_sparse.methods.engine import DensePolicy, SparseAttentionConfig
from dit_sparse.methods.neighborhood import NeighborhoodConfig
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig
from dit_sparse.methods.temporal_reuse import TemporalReuseConfig

DRAFT = DraftAttentionConfig()

# (class, field, bad value): each must fail at construction with a message naming Class.field and the value
BAD = [
    (DraftAttentionConfig, "sparsity", 1.5), (DraftAttentionConfig, "sparsity", math.nan),
    (DraftAttentionConfig, "sparsity", True), (DraftAttentionConfig, "selection", "top"),
    (DraftAttentionConfig, "top_p", 0.0), (DraftAttentionConfig, "k_min", 0), (DraftAttentionConfig, "k_min", 2.0),
    (DraftAttentionConfig, "sink", 1), (DraftAttentionConfig, "same_frame", "yes"),
    (DraftAttentionConfig, "pooling", "max"), (DraftAttentionConfig, "pooling", ["mean"]),
    (PooledRectificationConfig, "sparsity", -0.1), (PooledRectificationConfig, "top_p", math.inf),
    (PooledRectificationConfig, "neighbours", 1), (PooledRectificationConfig, "gapr", None),
    (PooledRectificationConfig, "first_frame_dense", "no"), (PooledRectificationConfig, "rectify", 0),
    (PooledRectificationConfig, "combine", "rows"),
    (NeighborhoodConfig, "window", (2, 3, 3)), (NeighborhoodConfig, "window", (1, 3)),
    (NeighborhoodConfig, "window", 3.0), (NeighborhoodConfig, "kernel_size", (0, 3, 3)),
    (NeighborhoodConfig, "stride", 0), (NeighborhoodConfig, "dilation", (1, 1, True)),
    (NeighborhoodConfig, "causal", 1), (NeighborhoodConfig, "exact", "yes"),
    (TemporalReuseConfig, "refresh_period", 0), (TemporalReuseConfig, "refresh_period", 2.0),
    (TemporalReuseConfig, "retention", 1), (TemporalReuseConfig, "ratio_slope", -1.0),
    (TemporalReuseConfig, "clamp_ratio", None), (TemporalReuseConfig, "store_residual", "yes"),
    (TemporalReuseConfig, "residual_dtype", torch.int8), (TemporalReuseConfig, "drift_threshold", 3.0),
    (TemporalReuseConfig, "warn_bytes", -1),
    (DensePolicy, "dense_steps", -1), (DensePolicy, "dense_steps", 1.0), (DensePolicy, "dense_fraction", 1.5),
    (DensePolicy, "dense_layers", 3), (DensePolicy, "dense_layers", (1.5,)), (DensePolicy, "dense_heads", (-1,)),
    (DensePolicy, "dense_heads", ("1",)), (DensePolicy, "min_tokens", True), (DensePolicy, "force_dense", 1),
    (SparseAttentionConfig, "tile", (0, 4, 4)), (SparseAttentionConfig, "tile", (1, 4)),
    (SparseAttentionConfig, "tile", (1.0, 4, 4)), (SparseAttentionConfig, "block_size", 24),
    (SparseAttentionConfig, "block_size", 128.0), (SparseAttentionConfig, "backend", "bogus"),
    (SparseAttentionConfig, "draft", "draft"), (SparseAttentionConfig, "dense", {"dense_steps": 1}),
    (TokenLayout, "tile", (0, 4, 4)), (TokenLayout, "tile", (1.5, 4, 4)), (TokenLayout, "tile", (1, 4)),
    (TokenLayout, "text_tokens", True), (TokenLayout, "text_tokens", -1), (TokenLayout, "text_position", "middle"),
    (TokenLayout, "block_size", 100), (TokenLayout, "block_size", 128.0), (TokenLayout, "frames", 0),
    (TokenLayout, "packing", "dense"), (SparseAttentionConfig, "packing", "dense"),
    (SparseAttentionConfig, "packing", ["packed"]),
]

BASE = {SparseAttentionConfig: dict(draft=DRAFT), TokenLayout: dict(frames=2, height=8, width=8)}


@pytest.mark.parametrize("cls,name,value", BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD])
def test_bad_field_fails_at_construction(cls, name, value):
    with pytest.raises(ValueError) as err:
        cls(**{**BASE.get(cls, {}), name: value})
    msg = str(err.value)
    assert f"{cls.__name__}.{name}" in msg and repr(value) in msg, msg


def test_composite_errors_name_the_fix():
    for kw in (dict(tile=(0, 4, 4)), dict(backend="bogus"), dict(tile=(1, 3, 3), backend="triton")):
        with pytest.raises(ValueError, match="got .*expected .*fix: "):
            SparseAttentionConfig(draft=DRAFT, **kw)


def test_valid_configs_still_build():
    cfg = SparseAttentionConfig(draft=DRAFT, tile=[1, 4, 4], backend="torch",
                                dense=DensePolicy(dense_layers=[0, 2], dense_heads=range(2)))
    assert cfg.tile == (1, 4, 4) and cfg.dense.dense_layers == frozenset({0, 2})
    assert cfg.dense.dense_heads == frozenset({0, 1})
    assert TokenLayout(frames=2, height=8, width=8, tile=(1, 4, 4)).block_size == 16


def test_min_tokens_auto_is_the_devices_measured_break_even(monkeypatch):
    from dit_sparse.backends.break_even import sparse_break_even
    from dit_sparse.methods import engine

    policy = DensePolicy(min_tokens="auto")
    floor = sparse_break_even("cpu")
    assert floor and policy.token_floor("cpu") == floor
    assert policy.is_dense(step=0, num_steps=10, layer=0, video_tokens=floor - 1, device_type="cpu")
    assert not policy.is_dense(step=0, num_steps=10, layer=0, video_tokens=floor, device_type="cpu")
    monkeypatch.setattr(engine, "sparse_break_even", lambda device: None)
    assert policy.token_floor("cuda") == 0  # nothing measured there: nothing decided from a guess
    with pytest.raises(ValueError, match="needs the call's device"):
        policy.is_dense(step=0, num_steps=10, layer=0, video_tokens=10)
    with pytest.raises(ValueError, match='"auto"'):
        DensePolicy(min_tokens="fast")


def test_every_preset_runs_dense_below_the_break_even():
    from dit_sparse.integration.pipelines.presets import PRESETS

    assert PRESETS and all(p.config.dense.min_tokens == "auto" for p in PRESETS.values())
