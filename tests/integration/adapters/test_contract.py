"""The adapter contract, run on every entry of the adapter table (``CASES`` of each
``tests/integration/adapters/test_*.py``).

What each check asserts, and how to add an entry: ``tests/integration/adapters/harness.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import ALL_ON, DENSE, SPARSE, TOL, AdapterCase, adapter_spec, text_row_diffs, tiny_preset_config

import dit_sparse
from dit_sparse import DensePolicy
from dit_sparse.integration.adapters.base import SparseProcessorBase
from dit_sparse.integration.apply import attn_processors


def all_cases() -> list[AdapterCase]:
    """Every ``CASES`` entry of the test files next to this one (the adapter table), ids unique."""
    cases = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if path.stem == Path(__file__).stem:
            continue
        cases += getattr(importlib.import_module(path.stem), "CASES", [])
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), f"duplicate AdapterCase ids: {ids}"
    return cases


CASES = all_cases()
PIPELINE_CASES = [c for c in CASES if c.pipeline is not None]
ULYSSES_CASES = [c for c in CASES if c.cp == "ulysses"]


def last_run(rt) -> dict:
    """The summary of the generation that just ended. diffusers resets stateful hooks when a pipeline of a
    CacheMixin transformer ends (the runtime then keeps ``last_run``); others (SD3) keep the state until the next
    generation starts, so the current summary is the run's."""
    if rt.context.step == -1:
        return rt.last_run
    return rt.summary()


def by_id(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.id for c in cases])


# ---------------------------------------------------------------------------------------------- transformer
@by_id(CASES)
def test_dense_config_is_bit_exact(case):
    tr = case.transformer()
    ref = case.forward(tr)
    (rt,) = dit_sparse.apply(tr, DENSE)
    assert torch.equal(case.forward(tr), ref)
    assert rt.calls["sparse"] == 0 and rt.calls["dense"] == case.n_sparse_calls


@by_id(CASES)
def test_all_on_plan_matches_stock(case):
    tr = case.transformer()
    ref = case.forward(tr)
    (rt,) = dit_sparse.apply(tr, ALL_ON)
    out = case.forward(tr)
    torch.testing.assert_close(out, ref, **TOL)
    assert rt.calls == {"sparse": case.n_sparse_calls, "dense": 0}
    assert rt.context.grid == case.grid


@by_id(CASES)
def test_declared_processors_go_sparse_others_stay_stock_and_remove_restores(case):
    tr = case.transformer()
    ref = case.forward(tr)
    original = dict(attn_processors(tr))
    assert set(case.sparse) <= set(original) and set(case.stock) <= set(original), sorted(original)
    (rt,) = dit_sparse.apply(tr, SPARSE)
    procs = attn_processors(tr)
    replaced = [n for n, p in procs.items() if isinstance(p, SparseProcessorBase)]
    assert replaced == list(case.sparse)
    assert [procs[n].layer for n in replaced] == list(range(len(replaced)))  # forward order
    # every other processor (cross-attention, refiners, ...) is the very same stock object
    assert all(procs[n] is p for n, p in original.items() if n not in case.sparse)
    assert all(not isinstance(procs[n], SparseProcessorBase) for n in case.stock)
    out = case.forward(tr)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
    assert rt.calls["sparse"] == case.n_sparse_calls and rt.density < 1.0
    dit_sparse.remove(tr)
    assert all(attn_processors(tr)[k] is v for k, v in original.items())
    assert torch.equal(case.forward(tr), ref)
    assert not dit_sparse.is_applied(tr)


TEXT_CASES = [c for c in CASES if c.text_rows and adapter_spec(c).text_position is not None]


@by_id(TEXT_CASES)
def test_text_rows_equal_stock_on_the_declared_side(case):
    """Text query rows read every key (docs/models.md#text-placement): at the declared text position they equal the
    stock attention under a sparse plan, video rows differ. Declaring the other side must break it (negative
    control)."""
    tr = case.transformer()
    (rt,) = dit_sparse.apply(tr, SPARSE)
    side = rt.adapter.text_position
    res = text_row_diffs(tr, case, side)
    assert res, "no sparse call with text tokens: the text position is not exercised"
    for name, _, text_diff, video_diff in res:
        assert text_diff < 1e-5 and video_diff > 1e-3, (name, text_diff, video_diff)
    # declared on the other side, the real text rows are planned as video rows: they go sparse and differ
    rt.adapter = dataclasses.replace(rt.adapter, text_position={"before": "after", "after": "before"}[side])
    assert all(text_diff > 1e-3 for _, _, text_diff, _ in text_row_diffs(tr, case, side))


@by_id(CASES)
def test_sparse_path_does_not_sync(case, monkeypatch):
    """No host sync outside the engine either: after a warm-up forward, neither the context hook nor any dit_sparse
    processor call of a sparse forward forces a device-to-host sync, except the documented reads made through
    :func:`dit_sparse.integration.context.host_read` (the step from the timestep, a grid read from ids, a valid-text
    count), each at most once per forward. The inputs are the same tensors at every forward, as a pipeline passes its
    ids and prompt masks. diffusers' own code between the processors is not ours and is not guarded (HunyuanVideo 1.5's
    forward indexes with boolean masks, for one)."""
    from collections import Counter

    from dit_sparse.integration.context import ContextHook, host_read
    from tests.sync_guard import no_host_sync

    active, reads = [], []

    def guarded(what, fn, *args, **kwargs):
        if not active:
            return fn(*args, **kwargs)
        with no_host_sync(f"{case.id}: {what}", allow=(host_read,)) as rec:
            out = fn(*args, **kwargs)
        reads.extend(rec.allowed)
        return out

    pre_forward = ContextHook.pre_forward
    monkeypatch.setattr(ContextHook, "pre_forward",
                        lambda self, *a, **k: guarded("the context hook", pre_forward, self, *a, **k))
    tr = case.transformer()
    (rt,) = dit_sparse.apply(tr, SPARSE)
    for proc in attn_processors(tr).values():
        if isinstance(proc, SparseProcessorBase):
            cls = type(proc)
            call = functools.wraps(cls.__call__)(  # keeps the signature diffusers filters kwargs by
                lambda self, *a, _call=cls.__call__, **k: guarded(self.name, _call, self, *a, **k))
            proc.__class__ = type(f"Guarded{cls.__name__}", (cls,), {"__call__": call})
    inputs = case.inputs(tr)
    case.forward(tr, lambda _: inputs)  # warm-up: layout indices, cached masks, first reads of the inputs
    for _ in range(2):
        active.append(True)
        before = rt.calls["sparse"]
        case.forward(tr, lambda _: inputs)
        active.clear()
        assert rt.calls["sparse"] - before == case.n_sparse_calls
        twice = {why: n for why, n in Counter(reads).items() if n > 1}
        assert not twice, f"host reads made more than once in one forward: {twice}"
        reads.clear()


def test_every_adapter_has_an_entry():
    """Each registered transformer class has at least one table entry."""
    from dit_sparse.integration.adapters.base import supported_transformers

    covered = {type(c.transformer()).__name__ for c in CASES}
    assert covered == set(supported_transformers())


# ---------------------------------------------------------------------------------------------- context parallel
@by_id([c for c in CASES if c.cp == "no-plan"])
def test_no_cp_plan_in_diffusers(case):
    """diffusers has no context-parallel plan for this transformer: ``enable_parallelism`` itself refuses it
    ("`cp_plan` must be provided ..."), so dit_sparse never sees a sharded call. When diffusers adds a plan, this
    fails: then test the entry under Ulysses (``cp="ulysses"``)."""
    assert type(case.transformer())._cp_plan is None


@by_id([c for c in CASES if c.cp == "refuses"])
def test_cp_refused_with_a_clear_error(case):
    from diffusers import ContextParallelConfig

    tr = case.transformer()
    for p in attn_processors(tr).values():  # what enable_parallelism sets on every processor
        p._parallel_config = ContextParallelConfig(ulysses_degree=2)
    with pytest.raises(NotImplementedError, match=type(tr).__name__):
        dit_sparse.apply(tr, SPARSE)
    assert not dit_sparse.is_applied(tr)


# cp="ulysses" entries: test_adapter_table_entries_under_ulysses in
# tests/integration/pipelines/test_context_parallel.py (one
# 2-process gloo run for the whole table)


# ---------------------------------------------------------------------------------------------- pipeline
@by_id(PIPELINE_CASES)
def test_pipeline_dense_bit_exact_sparse_end_to_end_and_remove(case):
    pipe = case.pipeline()
    with torch.no_grad():
        ref = case.run(pipe, 2)
        runtimes = dit_sparse.apply(pipe, DENSE)
        assert np.array_equal(case.run(pipe, 2), ref)
        assert all(last_run(rt)["calls"]["sparse"] == 0 for rt in runtimes)
        dit_sparse.remove(pipe)
        runtimes = dit_sparse.apply(pipe, SPARSE)
        out = case.run(pipe, 2)
        assert out.shape == ref.shape and np.isfinite(out).all() and not np.array_equal(out, ref)
        for rt in runtimes:
            run = last_run(rt)
            assert run["steps"] == 2 and run["calls"]["sparse"] > 0 and run["density"] < 1.0
        assert np.array_equal(case.run(pipe, 2), out)  # same seed, second generation: state was reset
        dit_sparse.remove(pipe)
        assert np.array_equal(case.run(pipe, 2), ref)


@by_id(PIPELINE_CASES)
def test_dense_warmup_step_runs_stock_attention(case):
    """``dense_steps=1``: step 0 runs every targeted call with the stock attention, step 1 runs them sparse."""
    pipe = case.pipeline()
    cfg = dataclasses.replace(SPARSE, dense=DensePolicy(dense_steps=1))
    with torch.no_grad():
        runtimes = dit_sparse.apply(pipe, cfg)
        case.run(pipe, 2)
    for rt in runtimes:
        calls = last_run(rt)["calls"]
        assert calls["sparse"] == calls["dense"] > 0, calls


@by_id([c for c in PIPELINE_CASES if c.preset is not None])
def test_preset_renders_through_the_pipeline(case):
    preset = dit_sparse.get_preset(case.preset)
    pipe = case.pipeline()
    assert preset.transformer_class == type(pipe.transformer).__name__
    steps = 3
    with torch.no_grad():
        (rt, *_) = dit_sparse.apply(pipe, tiny_preset_config(case.preset))
        out = case.run(pipe, steps)
    assert np.isfinite(out).all()
    assert last_run(rt)["steps"] == steps and last_run(rt)["calls"]["sparse"] > 0
