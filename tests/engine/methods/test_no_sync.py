"""A sparse call after warm-up never forces a device-to-host sync, checked on CPU with a
``TorchDispatchMode`` (``tests/sync_guard.py``) over the engine's whole per-call path: permute, selection, plan
build, dispatch, the op (torch backend), epilogues, merges, unpermute."""

from __future__ import annotations

import pytest
import torch

from dit_sparse import TokenLayout
from dit_sparse.methods.draft_attention import DraftAttentionConfig
from dit_sparse.methods.engine import DensePolicy, SparseAttention, SparseAttentionConfig
from dit_sparse.methods.neighborhood import NeighborhoodConfig
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig
from dit_sparse.methods.temporal_reuse import TemporalReuseConfig
from tests.sync_guard import no_host_sync

TINY = dict(tile=(1, 4, 4), block_size=16)
LAYOUT = TokenLayout(frames=3, height=8, width=12, text_tokens=10, text_position="after", tile=(1, 4, 4))

CONFIGS = {
    "draft_row_topk": dict(draft=DraftAttentionConfig(sparsity=0.75, sink=False)),
    "draft_row_topp": dict(draft=DraftAttentionConfig(sparsity=0.5, selection="row_topp", top_p=0.8)),
    "draft_head_global": dict(draft=DraftAttentionConfig(sparsity=0.75, selection="head_global")),
    "rect_block": dict(rectification=PooledRectificationConfig(sparsity=0.8)),
    "rect_row": dict(rectification=PooledRectificationConfig(sparsity=0.8, combine="row")),
    "draft_rect_block": dict(draft=DraftAttentionConfig(sparsity=0.8), rectification=PooledRectificationConfig()),
    "draft_rect_row": dict(draft=DraftAttentionConfig(sparsity=0.8),
                           rectification=PooledRectificationConfig(combine="row")),
    "neighborhood_tiles": dict(neighborhood=NeighborhoodConfig(window=(1, 3, 3))),
    "neighborhood_tokens": dict(neighborhood=NeighborhoodConfig(kernel_size=(3, 5, 5), stride=(1, 2, 2))),
    "dense_heads": dict(draft=DraftAttentionConfig(sparsity=0.75), dense=DensePolicy(dense_heads=(1,))),
    "reuse_retention": dict(draft=DraftAttentionConfig(sparsity=0.75),
                            reuse=TemporalReuseConfig(refresh_period=2, retention=True)),
    "reuse_rect": dict(rectification=PooledRectificationConfig(sparsity=0.8),
                       reuse=TemporalReuseConfig(refresh_period=2, retention=False)),
}


def _qkv(seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, LAYOUT.seq_len, 2, 16, generator=g) for _ in range(3))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_sparse_calls_do_not_sync(name):
    engine = SparseAttention(SparseAttentionConfig(**CONFIGS[name], **TINY))
    kw = dict(layout=LAYOUT, num_steps=10, layer=0, branch="cond")
    engine(*_qkv(0), step=0, **kw)  # warm-up: layout index tensors, cached masks
    # steps 1-4: with refresh_period=2 these are reuse steps (1, 3) and rebuild steps (2, 4)
    for step in range(1, 5):
        with no_host_sync(f"{name} at step {step}"):
            out = engine(*_qkv(step), step=step, **kw)
    assert out.shape == _qkv(0)[0].shape and torch.isfinite(out).all()


def test_the_guard_catches_a_sync():
    """The guard itself: reading a value, nonzero, a boolean-mask index, and the host copies that dispatch nothing
    on CPU (``tolist``, ``numpy``, ``cpu``) each fail."""
    x = torch.randn(5)
    for fn in (lambda: float(x.sum()), lambda: x.nonzero(), lambda: x[x > 0], lambda: bool((x > 0).any()),
               lambda: x.tolist(), lambda: x.max().tolist(), lambda: x.numpy(), lambda: x.cpu()):
        with pytest.raises(AssertionError, match="sync"):
            with no_host_sync():
                fn()


def test_the_guard_allows_a_documented_read():
    """``rec.allow(reason)`` pauses recording for its body only; the reason is kept."""
    x = torch.randn(5)
    with no_host_sync() as rec:
        with rec.allow("a documented read"):
            x.tolist(), float(x.sum())
    assert rec.allowed == ["a documented read"] and not rec.hits
    with pytest.raises(AssertionError, match="sync"):
        with no_host_sync() as rec:
            with rec.allow("a documented read"):
                pass
            x.tolist()


def test_the_guard_allows_reads_inside_named_functions():
    """``allow=(fn,)``: syncs made inside a call of ``fn`` are kept with that call's ``why``; others still fail."""
    from dit_sparse.integration.context import host_read

    x = torch.randn(5)
    with no_host_sync(allow=(host_read,)) as rec:
        host_read("a reason", lambda: x.tolist())
        host_read("another", lambda: float(x.sum()))
    assert rec.allowed == ["a reason", "another"]
    with pytest.raises(AssertionError, match="sync"):
        with no_host_sync(allow=(host_read,)):
            host_read("a reason", lambda: None)
            x.tolist()


@pytest.mark.parametrize("name", ["draft_row_topk", "rect_block", "rect_row", "neighborhood_tokens", "dense_heads",
                                  "reuse_retention", "reuse_rect"])
@torch.no_grad()
def test_engine_compiles_without_graph_breaks(name):
    """The per-call path (torch backend) is one graph: ``fullgraph=True`` raises on any break. Warm-up runs
    eagerly first (layout indices and static masks are cached then, and enter the graph as constants)."""
    torch._dynamo.reset()
    cfg = SparseAttentionConfig(**CONFIGS[name], **TINY, backend="torch")
    eager, compiled_engine = SparseAttention(cfg), SparseAttention(cfg)
    kw = dict(layout=LAYOUT, num_steps=10, layer=0, branch="cond")
    for engine in (eager, compiled_engine):
        engine(*_qkv(0), step=0, **kw)

    def call(q, k, v, step):
        return compiled_engine(q, k, v, step=step, **kw)

    compiled = torch.compile(call, fullgraph=True, backend="eager")
    for step in (1, 2):  # a reuse step and a rebuild step with refresh_period=2
        torch.testing.assert_close(compiled(*_qkv(step), step), eager(*_qkv(step), step=step, **kw),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [dict(kernel_size=(3, 5, 5), stride=(1, 2, 2)), dict(window=(1, 3, 3))])
@torch.no_grad()
def test_token_exact_neighborhood_does_not_sync(window):
    """The token-exact torch path (``neighborhood_attention_exact``): its gather width comes from the static plan,
    read once per (layout, window), not per call."""
    from dit_sparse.methods.neighborhood import neighborhood_attention_exact

    cfg = NeighborhoodConfig(**window, exact=True)
    q, k, v = (LAYOUT.permute(t) for t in _qkv(0))
    ref = neighborhood_attention_exact(q, k, v, LAYOUT, cfg)  # warm-up: plan and width cached
    with no_host_sync("neighborhood_attention_exact"):
        out = neighborhood_attention_exact(q, k, v, LAYOUT, cfg)
    assert torch.equal(out, ref)


@torch.no_grad()
def test_drift_refresh_is_the_documented_sync():
    """``drift_threshold`` decides on the host whether to rebuild: the one opt-in sync (TemporalReuseConfig doc)."""
    cfg = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.75),
                                reuse=TemporalReuseConfig(refresh_period=4, drift_threshold=0.5), **TINY)
    engine = SparseAttention(cfg)
    kw = dict(layout=LAYOUT, num_steps=10, layer=0, branch="cond")
    engine(*_qkv(0), step=0, **kw)
    with pytest.raises(AssertionError, match="_local_scalar_dense"):
        with no_host_sync("drift check"):
            engine(*_qkv(1), step=1, **kw)


def test_host_memo_reads_once_per_tensor_object():
    """Same tensor object and version: one read; an in-place change, another object with equal values, or a new
    forward (for inference tensors, which have no version counter) read again."""
    from dit_sparse.integration import context

    calls = []

    def read(t):
        return context.host_memo("test", t, None, lambda: calls.append(1) or float(t.sum()))

    x = torch.ones(3)
    assert read(x) == read(x) == 3.0 and len(calls) == 1
    x.add_(1)
    assert read(x) == 6.0 and len(calls) == 2
    assert read(x.clone()) == 6.0 and len(calls) == 3
    with torch.inference_mode():
        y = torch.ones(2)
    assert read(y) == read(y) == 2.0 and len(calls) == 4
    context._next_forward()  # what the context hook does at every forward
    assert read(y) == 2.0 and len(calls) == 5
