"""Every registered backend against the fp32 torch reference on CUDA (run by the GPU suite).

Parametrized over ``dit_sparse.backends.BACKENDS`` at collection, so a backend registered later (``hopper``,
``fa4``) is tested with no change here. Each case is a call the production path makes (bf16, head dim 128,
128-token blocks, partial key blocks, a ragged last block): a backend that cannot run it skips with its own
reasons (``not_supported_reasons`` + ``segment_reasons``), one that can must match the reference. CPU: skipped
(the Triton interpreter cases are in test_triton_kernel.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from dit_sparse import block_sparse_attention
from dit_sparse.backends import BACKENDS, AttentionInputs
from dit_sparse.plan import SparsePlan
from dit_sparse.reference.attention import block_sparse_attention_reference
from dit_sparse.segment import PooledSegment

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and TRITON_INTERPRET=0 (every backend compiled, against the torch reference)")]

BATCH, HEADS, DIM, BLOCK = 2, 3, 128, 128
# a ragged last block; the sequence and the block count (16) are multiples of 16 as at model shapes, so that the
# kernels compile with the op benchmark's integer specialisations (Triton's on-disk cache then serves it)
SEQ = 15 * BLOCK + 48
ATOL = RTOL = 2e-2  # bf16 inputs


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _case(name: str, seed: int = 0):
    """``(q, k, v, plan, return_lse, pooled)`` of one case, on CUDA."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(BATCH, SEQ, HEADS, DIM, generator=g) for _ in range(3))
    q = q * 2  # peakier softmax: outputs of order 0.1-1, so the tolerances mean something
    m = _cdiv(SEQ, BLOCK)
    valid = torch.full((m,), BLOCK, dtype=torch.int32)
    valid[-1] = SEQ - (m - 1) * BLOCK
    if name == "dense":  # all-on, every key real: what SDPA and xformers take
        plan = SparsePlan.dense(seq_q=SEQ, seq_k=SEQ, block_q=BLOCK, block_k=BLOCK)
        lse, pooled = False, None
    else:
        valid[2], valid[5] = 70, 1  # padding slots inside key blocks (a packed layout's partial blocks)
        mask = torch.rand(BATCH, HEADS, m, m, generator=g) < 0.4
        mask[..., torch.arange(m), torch.arange(m)] = True
        mask[0, 0, 1] = False  # a query block that reads nothing
        plan = SparsePlan.from_dense(mask, block_q=BLOCK, block_k=BLOCK, seq_q=SEQ, seq_k=SEQ, kv_block_valid=valid)
        lse, pooled = name == "sparse_lse_epilogue", None
        if lse:
            plan = plan.with_epilogue(out_scale=torch.rand(BATCH, HEADS, m, generator=g) + 0.5,
                                      out_bias=torch.randn(BATCH, SEQ, HEADS, DIM, generator=g) * 0.1)
        if name == "pooled":  # the row mode's segment: one pooled key per block, read where the plan skips
            nk = m
            pooled = PooledSegment(keys=torch.randn(1, HEADS, nk, DIM, generator=g),
                                   values=torch.randn(1, HEADS, nk, DIM, generator=g),
                                   log_count=torch.log(valid.float().clamp_min(1)),
                                   read=~mask, gate=None)
    to = dict(device="cuda")
    q, k, v = (t.to(**to, dtype=torch.bfloat16) for t in (q, k, v))
    plan = plan.to("cuda")
    if pooled is not None:
        pooled = PooledSegment(keys=pooled.keys.cuda(), values=pooled.values.cuda(),
                               log_count=pooled.log_count.cuda(), read=pooled.read.cuda())
    return q, k, v, plan, lse, pooled


CASES = ["sparse", "sparse_lse_epilogue", "pooled", "dense"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", sorted(n for n in BACKENDS if n != "torch"))  # torch: the reference itself
@torch.no_grad()
def test_backend_matches_reference(backend, case):
    q, k, v, plan, return_lse, pooled = _case(case)
    scale = 1.0 / math.sqrt(DIM)
    b = BACKENDS[backend]
    inputs = AttentionInputs(q, k, v, plan, scale, return_lse, pooled)
    reasons = b.not_supported_reasons(inputs) + b.segment_reasons(inputs)
    if reasons:
        pytest.skip(f"backend {backend!r} cannot run the {case!r} case: " + "; ".join(reasons))
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), plan, scale=scale, return_lse=True,
                                           pooled=pooled)
    got = block_sparse_attention(q, k, v, plan, scale=scale, return_lse=return_lse, backend=backend, pooled=pooled)
    out = got[0] if return_lse else got
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), f"{backend}: non-finite output"
    torch.testing.assert_close(out.float(), ref[0], atol=ATOL, rtol=RTOL)
    if return_lse:
        lse, ref_lse = got[1], ref[1]
        empty = torch.isinf(ref_lse)
        assert empty.any(), "the case must hold a row that reads nothing"
        assert torch.equal(torch.isinf(lse), empty), f"{backend}: lse must be -inf exactly on rows reading nothing"
        torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=ATOL, rtol=RTOL)
    # a second call on fresh inputs through the same compiled / autotuned path
    q2 = torch.randn_like(q)
    ref2 = block_sparse_attention_reference(q2.float(), k.float(), v.float(), plan, scale=scale, pooled=pooled)
    out2 = block_sparse_attention(q2, k, v, plan, scale=scale, backend=backend, pooled=pooled)
    torch.testing.assert_close(out2.float(), ref2.float(), atol=ATOL, rtol=RTOL)
