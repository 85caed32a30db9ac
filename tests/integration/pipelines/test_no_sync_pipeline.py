"""No host sync on the embedded pipeline: after a warm-up generation, no sparse attention call of a preset
forces a device-to-host sync (``tests/sync_guard.py``; every ``attend`` of the dit_sparse processors is guarded)."""

from __future__ import annotations

import pytest
import torch

import dit_sparse
from dit_sparse.integration.adapters.base import SparseProcessorBase
from dit_sparse.tiny import model as tm
from tests.sync_guard import no_host_sync
from tests.utils import always_sparse


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 320-token calls: threads only add contention on a shared 2-core runner
    yield tm.build_pipeline()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", ["tiny-wan:draft-rect-80", "tiny-wan:retention"])
@torch.no_grad()
def test_preset_sparse_calls_do_not_sync(pipe, preset, monkeypatch):
    (rt,) = dit_sparse.apply(pipe, always_sparse(preset))
    try:
        call = {**tm.DEFAULT_CALL, "num_inference_steps": 4, "output_type": "latent"}
        pipe(tm.DEFAULT_PROMPTS[0], generator=torch.Generator().manual_seed(0), **call)  # warm-up generation
        attend = SparseProcessorBase.attend
        sparse_calls = []

        def guarded(self, *args, **kwargs):
            before = self.runtime.calls["sparse"]
            with no_host_sync(f"{preset}: {self.name}"):
                out = attend(self, *args, **kwargs)
            sparse_calls.append(self.runtime.calls["sparse"] - before)
            return out

        monkeypatch.setattr(SparseProcessorBase, "attend", guarded)
        pipe(tm.DEFAULT_PROMPTS[1], generator=torch.Generator().manual_seed(1), **call)
        assert sum(sparse_calls) > 0 and rt.last_run["calls"]["sparse"] == sum(sparse_calls)
    finally:
        dit_sparse.remove(pipe)
