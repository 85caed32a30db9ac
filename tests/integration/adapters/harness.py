"""The shared adapter test harness: one table entry per model, the generic checks run on every entry.

Every adapter must pass the same contract (docs/models.md#text-placement). Instead of copying the lifecycle
tests per model, a model's test file declares ``CASES = [AdapterCase(...)]`` and keeps only its model-specific tests;
``test_contract.py`` finds every ``CASES`` in ``tests/integration/adapters/test_*.py`` and runs these checks on each
entry:

* the dense config (``force_dense``) is bit-exact vs stock (``torch.equal``) for the transformer and, when the
  entry has a pipeline, for the pipeline;
* an all-on plan (every block) matches stock within 1e-5, all targeted calls run sparse, the grid is read;
* exactly the declared processors become dit_sparse processors; every other processor (cross-attention, refiners,
  face blocks, audio paths) stays the very same stock object; a sparse config changes the output, finitely;
  ``remove()`` restores the stock objects and bit-exact output;
* text position: under a sparse plan every text query row equals the stock attention (text rows read every key)
  while video rows differ; declaring the text on the other side breaks it (negative control);
* no host sync: after a warm-up forward (same input tensors, as a pipeline passes them), the context hook and every
  dit_sparse processor call run no device-to-host sync except documented ``dit_sparse.integration.context.host_read``
  reads, each at most once per forward (``tests/sync_guard.py``);
* a sparse preset of the family (scaled to the tiny grid: 16-token blocks, no dense layers) renders finite
  output through the real pipeline class, with sparse calls; a second generation is identical (state reset);
* context parallelism: ``cp="ulysses"`` entries run in the 2-process gloo run of
  ``tests/integration/pipelines/test_context_parallel.py`` (sparse under Ulysses == sparse single process);
  ``cp="no-plan"`` entries are transformers diffusers gives no ``_cp_plan`` (``enable_parallelism`` refuses them
  itself: checked); ``cp="refuses"`` entries must raise ``NotImplementedError`` naming the model at ``apply``.

Adding a model (see ARCHITECTURE.md "Adding a model"): write ``tests/integration/adapters/test_<model>.py`` with
builders for a TINY transformer (a few hundred tokens, 1-2 layers, heads x head_dim small) and its forward kwargs,
optionally a
tiny offline pipeline (``tests/tiny.py`` has the text stacks) and a seeded ``run(pipe, steps)``, then::

    CASES = [AdapterCase(
        id="wan",                                     # pytest id; variants get their own entry ("cogvideox-2b")
        transformer=wan_transformer,                  # () -> seeded transformer in eval mode
        inputs=lambda tr: transformer_inputs(),       # tr -> forward kwargs (fresh tensors, same every call)
        sparse=("blocks.0.attn1.processor", "blocks.1.attn1.processor"),   # exactly the processors replaced
        stock=("blocks.0.attn2.processor",),          # processors that must stay stock (cross-attention, ...)
        grid=(5, 16, 16),                             # the (frames, rows, cols) the adapter must read
        pipeline=wan_pipeline,                        # optional: () -> the real pipeline class, tiny, offline
        run=lambda pipe, steps: run(pipe, steps=steps),  # seeded (pipe, steps) -> np output
        preset="wan2.1-t2v-1.3b:draft-80",            # a preset of the family for the pipeline render
        cp="ulysses",                                 # "ulysses" | "no-plan" | "refuses"
    )]

and declare the family in ``dit_sparse/integration/adapters/registry.py:FAMILIES``. Nothing else: the checks
above then run on the new entry (``pytest tests/integration/adapters -k <id>``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import dit_sparse
from dit_sparse import DensePolicy, DraftAttentionConfig, SparseAttentionConfig
from dit_sparse.integration.adapters.base import SparseProcessorBase, get_adapter
from dit_sparse.integration.apply import attn_processors

DENSE = SparseAttentionConfig(dense=DensePolicy(force_dense=True))
ALL_ON = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.0), block_size=16, backend="torch")
SPARSE = SparseAttentionConfig(draft=DraftAttentionConfig(sparsity=0.8, sink=False), block_size=16, backend="torch")
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 round-off of a different summation order (measured max diffs ~1e-6)
CP_KINDS = ("ulysses", "no-plan", "refuses")


@dataclass(frozen=True)
class AdapterCase:
    """One row of the adapter table (see the module docstring for an example).

    Args:
        id: pytest id of the entry.
        transformer: builds the tiny seeded transformer (eval mode); called once per check.
        inputs: ``transformer -> forward kwargs``; must return equal tensors on every call.
        sparse: exactly the processor names (``transformer.attn_processors`` keys) that become sparse, in forward
            order (their layer indices are checked against this order).
        stock: processor names that must keep their stock processor object (cross-attention, refiner, ...).
        grid: the ``(frames, rows, cols)`` the context hook must read from ``inputs``.
        sparse_calls: sparse attention calls of one forward under the all-on plan (default ``len(sparse)``).
        output: picks the compared tensor from the forward's return value (default ``out[0]``).
        pipeline: builds the tiny offline pipeline (real pipeline class), or None.
        run: ``(pipe, steps) -> output`` with a fixed seed; needed with ``pipeline``.
        preset: a preset name of the family, rendered through the pipeline (scaled to the tiny grid).
        cp: ``"ulysses"`` (works, tested in the gloo run), ``"no-plan"`` (diffusers has no ``_cp_plan``),
            ``"refuses"`` (the adapter raises ``NotImplementedError``).
        cp_inputs: forward kwargs for the Ulysses run when ``inputs`` cannot be sharded by diffusers' own plan
            (default ``inputs``).
        text_rows: whether the text-position check applies (False when the text is only in cross-attention or a
            model-specific test covers it, e.g. masks that truncate the text).
    """

    id: str
    transformer: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict]
    sparse: tuple[str, ...]
    grid: tuple[int, int, int]
    stock: tuple[str, ...] = ()
    sparse_calls: int | None = None
    output: Callable[[Any], torch.Tensor] = lambda out: out[0]
    pipeline: Callable[[], Any] | None = None
    run: Callable[..., Any] | None = None
    preset: str | None = None
    cp: str = "ulysses"
    cp_inputs: Callable[[torch.nn.Module], dict] | None = None
    text_rows: bool = True

    def __post_init__(self):
        if self.cp not in CP_KINDS:
            raise ValueError(f"AdapterCase {self.id}: cp must be one of {CP_KINDS}, got {self.cp!r}.")
        if (self.pipeline is None) != (self.run is None):
            raise ValueError(f"AdapterCase {self.id}: give both pipeline and run, or neither.")
        if self.preset is not None and self.pipeline is None:
            raise ValueError(f"AdapterCase {self.id}: a preset is rendered through the pipeline; give one.")
        if not self.sparse:
            raise ValueError(f"AdapterCase {self.id}: name the processors that become sparse.")

    def __repr__(self) -> str:  # short pytest ids / failure messages
        return f"AdapterCase({self.id})"

    @property
    def n_sparse_calls(self) -> int:
        return len(self.sparse) if self.sparse_calls is None else self.sparse_calls

    def forward(self, tr, inputs=None):
        with torch.no_grad():
            return self.output(tr(**(inputs or self.inputs)(tr)))


def record_attend(tr) -> list[dict]:
    """Wrap every dit_sparse processor's ``attend``: per call record name, q, text tokens, output and the stock
    output (``dense()``, the model's own attention call)."""
    calls = []
    for name, proc in attn_processors(tr).items():
        if isinstance(proc, SparseProcessorBase):
            def attend(q, k, v, *, text_tokens, dense, scale=None, _p=proc, _n=name):
                out = SparseProcessorBase.attend(_p, q, k, v, text_tokens=text_tokens, dense=dense, scale=scale)
                calls.append(dict(name=_n, tokens=q.shape[1], text=text_tokens, out=out, stock=dense()))
                return out
            proc.attend = attend
    return calls


def text_row_diffs(tr, case: AdapterCase, position: str) -> list[tuple[str, int, float, float]]:
    """Forward under the applied config; per sparse call with text: (name, text tokens, max |out - stock| over the
    text rows at ``position``, over the video rows)."""
    calls = record_attend(tr)
    case.forward(tr)
    res = []
    for c in calls:
        t = c["text"]
        if t == 0:
            continue
        d = (c["out"] - c["stock"]).abs()
        text, video = (d[:, :t], d[:, t:]) if position == "before" else (d[:, -t:], d[:, :-t])
        res.append((c["name"], t, float(text.max()), float(video.max())))
    return res


def tiny_preset_config(name: str) -> SparseAttentionConfig:
    """A preset's config for a tiny grid: 16-token blocks of 1x4x4 tiles, torch backend, no dense layers (a tiny
    model has 1-2 layers; the preset's ``dense_layers`` would cover all of them) and at most 1 dense step; the
    method, its sparsity, dense fraction and reuse settings are the preset's."""
    cfg = dit_sparse.get_preset(name).config
    dense = dataclasses.replace(cfg.dense, dense_layers=frozenset(), dense_steps=min(cfg.dense.dense_steps, 1),
                                min_tokens=0)
    reuse = cfg.reuse
    if reuse is not None:
        reuse = dataclasses.replace(reuse, refresh_period=min(reuse.refresh_period, 2))
    return dataclasses.replace(cfg, block_size=16, tile=(1, 4, 4), backend="torch", dense=dense, reuse=reuse)


def adapter_spec(case: AdapterCase):
    return get_adapter(case.transformer())
