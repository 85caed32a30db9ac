"""The ``compiled`` backend (torch.compile(flex_attention), CPU here) against the float64 oracle, and its dispatch.

Shapes are fixed per test so that each compiles once (a compile is seconds on CPU); hypothesis varies everything
else: plan contents, padding slots, epilogues, malformed CSR rows, the pooled segment and its gate. The same
fixed shapes also check that a new plan never recompiles.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dit_sparse
from dit_sparse import SparsePlan, block_sparse_attention
from dit_sparse.backends import AttentionInputs, choose_backend
from dit_sparse.backends import compiled as compiled_mod
from dit_sparse.reference.attention import block_sparse_attention_reference
from dit_sparse.segment import PooledSegment
from tests.utils import TOLERANCES

pytestmark = pytest.mark.skipif(not compiled_mod._has_cpp_compiler(), reason="torch.compile on CPU needs g++")

B, H, S, D, BLOCK = 2, 2, 200, 32, 32  # 7 blocks, the last one partial (8 tokens)
M = -(-S // BLOCK)


def _qkv(gen, dtype=torch.float32, seq_q=S, seq_k=S, dim=D):
    q = torch.randn(B, seq_q, H, dim, generator=gen)
    k, v = (torch.randn(B, seq_k, H, dim, generator=gen) for _ in range(2))
    return tuple(t.to(dtype) for t in (q, k, v))


def _segment(gen, mq, npooled, *, gate, bcast):
    b, h = (1, 1) if bcast else (B, H)
    read = torch.rand(b, h, mq, npooled, generator=gen) < 0.6
    return PooledSegment(keys=torch.randn(b, h, npooled, D, generator=gen),
                         values=torch.randn(b, h, npooled, D, generator=gen),
                         log_count=torch.rand(npooled, generator=gen) * 3.0, read=read,
                         gate=0.5 * torch.randn(b, h, npooled, D, generator=gen) if gate else None)


def _malform(num, idx, kind, gen):
    """One defect of the kinds the other backends are fuzzed with (read by the rule of dit_sparse.plan)."""
    num, idx = num.clone(), idx.clone()
    if kind == "count_past_width":
        num[0, 0, 1] = idx.shape[-1] + 5
        num[-1, -1, 2] = -3
    elif kind == "wild_index":
        idx[0, 0, 0, 0] = -1
        idx[-1, -1, 3, 1] = 10**6
    elif kind == "duplicates":
        idx[0, 0, 1, :3] = torch.tensor([2, 2, 2], dtype=torch.int32)
    elif kind == "unsorted":
        idx[0, 1, 3, :3] = torch.tensor([3, 0, 4], dtype=torch.int32)
        num[0, 1, 3] = 3
    return num, idx


def _oracle(q, k, v, plan, scale, pooled):
    f64 = None if pooled is None else PooledSegment(
        keys=pooled.keys, values=pooled.values, log_count=pooled.log_count, read=pooled.read, gate=pooled.gate)
    return block_sparse_attention_reference(q.double(), k.double(), v.double(), plan, scale=scale, pooled=f64)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.0, 1.0), padded=st.booleans(),
       epilogue=st.sampled_from(["none", "row_scale", "block_scale", "row_bias", "block_bias", "both"]),
       malformed=st.sampled_from(["none", "count_past_width", "wild_index", "duplicates", "unsorted"]),
       segment=st.sampled_from(["none", "plain", "gate", "bcast"]), npooled=st.sampled_from([5, 37]),
       scale=st.sampled_from([None, 0.37]))
def test_fuzz_against_float64_oracle(seed, density, padded, epilogue, malformed, segment, npooled, scale,
                                     monkeypatch):
    monkeypatch.setenv("DIT_SPARSE_CHECKS", "0")
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(gen)
    mask = torch.rand(B, H, M, M, generator=gen) < density
    valid = torch.randint(0, BLOCK + 1, (M,), generator=gen, dtype=torch.int32) if padded else None
    plan = SparsePlan.from_dense(mask, block_q=BLOCK, block_k=BLOCK, seq_q=S, seq_k=S, kv_block_valid=valid)
    if malformed != "none":
        num, idx = _malform(plan.kv_num_blocks, plan.kv_indices, malformed, gen)
        plan = SparsePlan(num, idx, BLOCK, BLOCK, S, S, valid)
    rows = {"row": S, "block": M}
    if epilogue in ("row_scale", "block_scale", "both"):
        n = rows["block" if epilogue == "block_scale" else "row"]
        plan = plan.with_epilogue(out_scale=torch.rand(B, H, n, generator=gen) + 0.5, out_bias=plan.out_bias)
    if epilogue in ("row_bias", "block_bias", "both"):
        n = rows["block" if epilogue == "block_bias" else "row"]
        plan = plan.with_epilogue(out_scale=plan.out_scale, out_bias=torch.randn(B, n, H, D, generator=gen))
    pooled = None if segment == "none" else _segment(gen, M, npooled, gate=segment == "gate",
                                                     bcast=segment == "bcast")
    out = block_sparse_attention(q, k, v, plan, scale=scale, backend="compiled", pooled=pooled)
    want = _oracle(q, k, v, plan, scale, pooled)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("seq_q,seq_k,dim,block_q,block_k", [(150, 200, 32, 32, 32), (64, 64, 16, 16, 16),
                                                              (130, 130, 64, 64, 32)])
def test_shapes_and_block_sizes(seq_q, seq_k, dim, block_q, block_k):
    gen = torch.Generator().manual_seed(seq_q + dim)
    q, k, v = _qkv(gen, seq_q=seq_q, seq_k=seq_k, dim=dim)
    mq, mk = -(-seq_q // block_q), -(-seq_k // block_k)
    mask = torch.rand(B, H, mq, mk, generator=gen) < 0.5
    mask[0, 0, 0] = False  # a row that reads no key: zero out, never NaN
    plan = SparsePlan.from_dense(mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k)
    out = block_sparse_attention(q, k, v, plan, backend="compiled")
    want = block_sparse_attention_reference(q.double(), k.double(), v.double(), plan)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert torch.equal(out[0, :block_q, 0], torch.zeros(block_q, dim))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_segment", [False, True], ids=["exact", "segment"])
def test_half_precision(dtype, with_segment):
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(gen, dtype)
    plan = SparsePlan.from_dense(torch.rand(B, H, M, M, generator=gen) < 0.5, block_q=BLOCK, block_k=BLOCK,
                                 seq_q=S, seq_k=S)
    pooled = _segment(gen, M, 9, gate=False, bcast=False) if with_segment else None
    out = block_sparse_attention(q, k, v, plan, backend="compiled", pooled=pooled)
    assert out.dtype == dtype
    want = _oracle(q, k, v, plan, None, pooled)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def test_new_plans_epilogues_and_segments_do_not_recompile(monkeypatch):
    """Layers, steps, CFG branches and new plans with the same shapes reuse one compilation per variant."""
    monkeypatch.setenv("DIT_SPARSE_CHECKS", "0")
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(gen)

    def call(i, seg):
        mask = torch.rand(B, H, M, M, generator=gen) < (0.2 + 0.1 * i)
        plan = SparsePlan.from_dense(mask, block_q=BLOCK, block_k=BLOCK, seq_q=S, seq_k=S,
                                     kv_block_valid=torch.randint(1, BLOCK + 1, (M,), generator=gen,
                                                                  dtype=torch.int32))
        if i % 2:
            plan = plan.with_epilogue(out_scale=torch.rand(B, H, S, generator=gen))
        pooled = _segment(gen, M, 21, gate=False, bcast=False) if seg else None
        return block_sparse_attention(q, k, v, plan, backend="compiled", pooled=pooled)

    call(0, False), call(0, True)  # one compilation each (or none: compiled by an earlier test)
    before = _dynamo_frames()
    for i in range(1, 6):
        call(i, False), call(i, True)
    assert _dynamo_frames() == before, "a new plan with the same shapes recompiled"


def _inputs(seq, *, lse=False):
    q = torch.zeros(1, seq, 1, 32)
    plan = SparsePlan.from_dense(torch.eye(-(-seq // 128), dtype=torch.bool)[None, None], block_q=128,
                                 block_k=128, seq_q=seq, seq_k=seq)
    return AttentionInputs(q, q, q, plan, 1.0, lse)


def test_dispatch_follows_the_break_even(monkeypatch):
    monkeypatch.setattr(compiled_mod, "sparse_break_even", lambda device: 1024)
    assert choose_backend(_inputs(1000)).name == "torch"
    assert choose_backend(_inputs(1024)).name == "compiled"
    # CPU flex returns no LSE: such calls go to the reference automatically, and a named call says why
    assert choose_backend(_inputs(4096, lse=True)).name == "torch"
    with pytest.raises(NotImplementedError, match="returns no log-sum-exp"):
        choose_backend(_inputs(4096, lse=True), "compiled")
    monkeypatch.setattr(compiled_mod, "sparse_break_even", lambda device: None)
    assert choose_backend(_inputs(4096)).name == "torch"
    assert any("no break-even measured" in r for r in compiled_mod.CompiledBackend().auto_reasons(_inputs(4096)))


def test_stored_break_even_is_read_from_the_package():
    from dit_sparse.backends.break_even import BREAK_EVEN_FILE, break_even_record, sparse_break_even

    assert BREAK_EVEN_FILE.exists(), "benchmarks/break_even.py writes it; the package ships it"
    rec = break_even_record()
    assert sparse_break_even("cpu") == rec["cpu"]["tokens"] and rec["cpu"]["tokens"] > 0
    assert sparse_break_even("no-such-device") is None


def test_past_the_recompile_limit_the_backend_refuses(monkeypatch):
    monkeypatch.setattr(compiled_mod, "_recompile_limit", lambda: len(compiled_mod._compile_times))
    inputs = _inputs(4096 + 17)  # a signature not compiled yet
    reasons = compiled_mod.CompiledBackend().not_supported_reasons(inputs)
    assert any("recompile limit" in r and "recompile_limit" in r for r in reasons), reasons


def test_first_call_compile_time_is_logged_once(caplog):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 96, 1, 16, generator=gen) for _ in range(3))
    plan = SparsePlan.from_dense(torch.rand(1, 1, 3, 3, generator=gen) < 0.7, block_q=32, block_k=32, seq_q=96,
                                 seq_k=96)
    with caplog.at_level(logging.INFO, logger="dit_sparse.backends"):
        for _ in range(3):
            block_sparse_attention(q, k, v, plan, backend="compiled")
    lines = [r.getMessage() for r in caplog.records if "first call for" in r.getMessage()]
    assert len(lines) <= 1  # 0 when an earlier test in this process compiled the same signature
    times = compiled_mod.compile_times()
    assert any("B=1 H=1 Sq=96 Sk=96 D=16" in sig for sig in times), times
    assert all(math.isfinite(t) and t >= 0 for t in times.values())


def test_named_backend_lists_every_reason():
    q = torch.zeros(1, 64, 1, 24, dtype=torch.float64)
    plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=32, block_k=32)
    with pytest.raises(NotImplementedError) as e:
        dit_sparse.block_sparse_attention(q, q, q, plan, backend="compiled")
    msg = str(e.value)
    assert "power-of-two head_dim" in msg and "float64" in msg and "torch reference runs float64" in msg


def test_hitting_dynamos_limit_raises_instead_of_running_uncompiled(monkeypatch):
    """Uncompiled flex reads only the mask function, not the block tables: a call past the limit must fail."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 64, 1, 16, generator=gen) for _ in range(3))
    plan = SparsePlan.from_dense(torch.eye(2, dtype=torch.bool)[None, None], block_q=32, block_k=32, seq_q=64,
                                 seq_k=64)
    block_sparse_attention(q, k, v, plan, backend="compiled")  # the flex frame holds at least one entry
    monkeypatch.setattr(compiled_mod, "_recompile_limit", lambda: 1)
    inputs = AttentionInputs(q, k, v, plan, 0.123, False)  # a new scale: a new compilation
    with pytest.raises(NotImplementedError, match="recompile limit"):
        compiled_mod.CompiledBackend().forward(inputs)
