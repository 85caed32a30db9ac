"""A sparse call (plan building, the compiled kernel, epilogues, merges) captured in one CUDA graph and replayed on
new inputs: possible only because the path never syncs with the host. GPU only.

Parametrized over every registered backend but ``torch`` (``dit_sparse.backends.BACKENDS``, read at collection:
a backend registered later is captured too). A backend that cannot run a method's calls skips with the reasons
its ``NotImplementedError`` gives (the dispatch contract for a named backend)."""

from __future__ import annotations

import os

import pytest
import torch

from dit_sparse import TokenLayout
from dit_sparse.backends import BACKENDS
from dit_sparse.methods.draft_attention import DraftAttentionConfig
from dit_sparse.methods.engine import SparseAttention, SparseAttentionConfig
from dit_sparse.methods.neighborhood import NeighborhoodConfig
from dit_sparse.methods.pooled_rectification import PooledRectificationConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0 (CUDA graph capture of a sparse "
                                       "call on every compiled backend)")

LAYOUT = TokenLayout(frames=4, height=16, width=24, text_tokens=40, text_position="after", tile=(1, 8, 8))
CONFIGS = {
    "draft": dict(draft=DraftAttentionConfig(sparsity=0.75)),
    "draft_rect_block": dict(draft=DraftAttentionConfig(sparsity=0.75), rectification=PooledRectificationConfig()),
    "rect_row": dict(rectification=PooledRectificationConfig(sparsity=0.8, combine="row")),
    "neighborhood": dict(neighborhood=NeighborhoodConfig(window=(3, 1, 1))),
}


def _qkv(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(1, LAYOUT.seq_len, 4, 64, generator=g, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("backend", sorted(n for n in BACKENDS if n != "torch"))  # torch: the reference
@torch.no_grad()
def test_sparse_call_replays_from_a_cuda_graph(name, backend):
    engine = SparseAttention(SparseAttentionConfig(**CONFIGS[name], tile=(1, 8, 8), backend=backend))
    kw = dict(layout=LAYOUT, step=5, num_steps=10, layer=0, branch="cond")
    static = _qkv(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: autotuning, compiling, cached layout tensors
        try:
            engine(*static, **kw)
        except NotImplementedError as e:  # a named backend that cannot run says why (no fallback)
            pytest.skip(f"backend {backend!r} cannot run the {name!r} calls: {e}")
        for _ in range(2):
            engine(*static, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = engine(*static, **kw)
    for seed in (1, 2):
        fresh = _qkv(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, engine(*fresh, **kw), atol=2e-2, rtol=2e-2)
