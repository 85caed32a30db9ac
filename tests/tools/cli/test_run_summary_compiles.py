"""The run summary records the compiled backend's first-call compile times (once per shape signature)."""

from __future__ import annotations

import json

import torch

from dit_sparse import SparsePlan, block_sparse_attention
from dit_sparse.backends import compiled
from dit_sparse.tools.outputs import RunLog


def test_run_summary_lists_the_compilations_of_this_process(tmp_path):
    q = torch.randn(1, 64, 1, 16)
    plan = SparsePlan.from_dense(torch.eye(2, dtype=torch.bool)[None, None], block_q=32, block_k=32, seq_q=64,
                                 seq_k=64)
    block_sparse_attention(q, q, q, plan, backend="compiled")
    with RunLog(tmp_path, []) as log:
        summary = log.write([], state="finished")
    assert summary["compile_s"] == {k: round(v, 3) for k, v in compiled.compile_times().items()}
    assert any("Sq=64 Sk=64 D=16" in k for k in summary["compile_s"])
    on_disk = json.loads((tmp_path / "run_summary.json").read_text())
    assert on_disk["compile_s"] == summary["compile_s"]
