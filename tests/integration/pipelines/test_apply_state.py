"""``sparse_processors`` marks nothing applied until its processors are installed, and
``runtime.summary()`` says which generation it describes (the last finished one between pipeline calls)."""

from __future__ import annotations

import torch
from test_wan import SPARSE, run, transformer_inputs, wan_pipeline, wan_transformer

import dit_sparse
from dit_sparse.integration.context import CONTEXT_HOOK


def _has_hook(tr) -> bool:
    registry = getattr(tr, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(CONTEXT_HOOK) is not None


@torch.no_grad()
def test_processors_never_installed_leave_nothing_applied():
    tr = wan_transformer()
    original = dict(tr.attn_processors)
    ref = tr(**transformer_inputs())[0]
    dit_sparse.sparse_processors(tr, SPARSE)  # the user changes their mind: never installed
    assert not dit_sparse.is_applied(tr)
    (rt,) = dit_sparse.apply(tr, SPARSE)  # used to be refused: "already applied"
    assert dit_sparse.is_applied(tr) and dit_sparse.get_runtime(tr) is rt
    assert not torch.allclose(tr(**transformer_inputs())[0], ref, atol=1e-4)
    dit_sparse.remove(tr)
    assert not dit_sparse.is_applied(tr) and not _has_hook(tr)
    assert all(tr.attn_processors[k] is v for k, v in original.items())
    assert torch.equal(tr(**transformer_inputs())[0], ref)


def test_pending_processors_are_cleared_by_remove():
    tr = wan_transformer()
    original = dict(tr.attn_processors)
    dit_sparse.sparse_processors(tr, SPARSE)
    assert _has_hook(tr) and dit_sparse.get_runtime(tr) is not None
    dit_sparse.remove(tr)
    assert not _has_hook(tr) and dit_sparse.get_runtime(tr) is None
    assert all(tr.attn_processors[k] is v for k, v in original.items())


def test_installed_processors_count_as_applied():
    tr = wan_transformer()
    tr.set_attn_processor(dit_sparse.sparse_processors(tr, SPARSE))
    assert dit_sparse.is_applied(tr)
    try:
        dit_sparse.apply(tr, SPARSE)
    except ValueError as e:
        assert "already applied" in str(e)
    else:
        raise AssertionError("a second apply on installed processors must be refused")


@torch.no_grad()
def test_summary_after_a_run_describes_the_last_finished_generation():
    pipe = wan_pipeline()
    (rt,) = dit_sparse.apply(pipe, SPARSE)
    assert rt.summary()["run"] == "none" and rt.summary()["calls"] == {"sparse": 0, "dense": 0}
    run(pipe)
    s = rt.summary()  # the pipeline call ended and reset the runtime: used to be all zeros
    assert s["run"] == "last" and s["calls"] == rt.last_run["calls"] and s["calls"]["sparse"] == 8
    assert s["steps"] == 2 and 0 < s["density"] < 1.0
    # during a generation it describes the calls so far
    seen = []
    pipe.transformer.register_forward_hook(lambda *a: seen.append(rt.summary()))
    run(pipe)
    layers = pipe.transformer.config.num_layers  # one sparse self-attention per layer
    assert seen[0]["run"] == "current" and seen[0]["calls"]["sparse"] == layers
