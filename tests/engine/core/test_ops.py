"""block_sparse_attention: the torch oracle against dense SDPA and brute force, dispatch, and input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dit_sparse
from dit_sparse import SparsePlan, TokenLayout, block_sparse_attention, dense_attention_lse
from dit_sparse.backends import AttentionInputs, choose_backend


def sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=scale).transpose(1, 2)


def brute_force(q, k, v, plan, scale):
    """Token-by-token float64 loops over (b, h, row): the definition in SparsePlan's docstring."""
    b_, sq, h_, d = q.shape
    out = torch.zeros(b_, sq, h_, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b_, h_, sq), float("-inf"), dtype=torch.float64)
    dense = plan.to_dense()
    kv_valid = plan.kv_block_valid
    for b in range(b_):
        for h in range(h_):
            for s in range(sq):
                keys = [j for j in range(k.shape[1])
                        if dense[b % dense.shape[0], h % dense.shape[1], s // plan.block_q, j // plan.block_k]
                        and (kv_valid is None or j % plan.block_k < int(kv_valid[j // plan.block_k]))]
                if keys:
                    logits = (k[b, keys, h].double() @ q[b, s, h].double()) * scale
                    lse[b, h, s] = torch.logsumexp(logits, 0)
                    out[b, s, h] = torch.softmax(logits, 0) @ v[b, keys, h].double()
    if plan.out_scale is not None or plan.out_bias is not None:
        from dit_sparse.epilogue import apply_epilogue

        out = apply_epilogue(out, plan)
    return out, lse


@pytest.mark.parametrize("shape", [(1, 128, 2, 64), (2, 113, 3, 59), (1, 203, 1, 111)], ids=str)
def test_oracle_dense_equals_sdpa_float64(shape):
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    plan = SparsePlan.dense(seq_q=shape[1], seq_k=shape[1], block_q=64, block_k=32)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-12, atol=1e-12)
    logits = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(shape[-1])
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-12, atol=1e-12)


def test_oracle_cross_attention_lengths():
    q = torch.randn(1, 50, 2, 16, dtype=torch.float64)
    k, v = (torch.randn(1, 77, 2, 16, dtype=torch.float64) for _ in range(2))
    plan = SparsePlan.dense(seq_q=50, seq_k=77, block_q=16, block_k=16)
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan, backend="torch"), sdpa(q, k, v))


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), sq=st.integers(1, 70), sk=st.integers(1, 70),
       d=st.sampled_from([4, 7, 16]), bq=st.sampled_from([8, 16, 24]), bk=st.sampled_from([8, 16, 24]),
       p=st.floats(0.0, 1.0), epi=st.sampled_from(["none", "row", "block"]), padded=st.booleans(),
       bcast=st.booleans(), seed=st.integers(0, 2**16))
def test_oracle_matches_brute_force_fuzz(b, h, sq, sk, d, bq, bk, p, epi, padded, bcast, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, h, d, generator=g, dtype=torch.float64)
    mq, mk = -(-sq // bq), -(-sk // bk)
    mask = torch.rand(1 if bcast else b, 1 if bcast else h, mq, mk, generator=g) < p  # empty rows included
    kv_valid = torch.randint(0, bk + 1, (mk,), generator=g, dtype=torch.int32) if padded else None
    plan = SparsePlan.from_dense(mask, block_q=bq, block_k=bk, seq_q=sq, seq_k=sk, kv_block_valid=kv_valid)
    if epi == "row":
        plan = plan.with_epilogue(torch.rand(b, h, sq, generator=g) + 0.5,
                                  torch.randn(b, sq, h, d, generator=g, dtype=torch.float64))
    elif epi == "block":
        plan = plan.with_epilogue(torch.rand(b, h, mq, generator=g) + 0.5,
                                  torch.randn(b, h, mq, d, generator=g, dtype=torch.float64).transpose(1, 2))
    scale = 1 / math.sqrt(d)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    ref_out, ref_lse = brute_force(q, k, v, plan, scale)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


def test_empty_rows_return_exactly_bias():
    q, k, v = (torch.randn(1, 64, 2, 8) for _ in range(3))
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    mask[:, :, 0, 0] = True
    bias = torch.randn(1, 4, 2, 8)  # per block
    plan = SparsePlan.from_dense(mask, block_q=16, block_k=16).with_epilogue(out_bias=bias)
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    assert torch.equal(out[:, 16:], bias[:, 1:].repeat_interleave(16, 1))
    assert torch.isinf(lse[:, :, 16:]).all() and (lse[:, :, 16:] < 0).all()
    no_bias = block_sparse_attention(q, k, v, plan.without_epilogue(), backend="torch")
    assert torch.equal(no_bias[:, 16:], torch.zeros_like(no_bias[:, 16:]))


def test_chunking_does_not_change_results(monkeypatch):
    from dit_sparse.reference import attention

    q, k, v = (torch.randn(1, 300, 2, 16, dtype=torch.float64) for _ in range(3))
    plan = SparsePlan.from_dense(torch.rand(1, 2, 5, 5) < 0.5, block_q=64, block_k=64, seq_q=300, seq_k=300)
    whole = block_sparse_attention(q, k, v, plan, backend="torch")
    monkeypatch.setattr(attention, "CHUNK_BYTES", 1)  # one query block per chunk
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan, backend="torch"), whole, rtol=0, atol=1e-14)


def test_layout_permuted_attention_equals_dense():
    """The padded, permuted sequence with kv_block_valid reproduces dense attention in model order."""
    layout = TokenLayout(frames=3, height=5, width=7, tile=(2, 4, 4), text_tokens=11, text_position="before")
    q, k, v = (torch.randn(2, layout.seq_len, 2, 8, dtype=torch.float64) for _ in range(3))
    plan = SparsePlan.dense(seq_q=layout.padded_len, seq_k=layout.padded_len, block_q=layout.block_size,
                            block_k=layout.block_size, kv_block_valid=layout.block_valid())
    out = block_sparse_attention(*(layout.permute(t) for t in (q, k, v)), plan, backend="torch")
    torch.testing.assert_close(layout.unpermute(out), sdpa(q, k, v), rtol=1e-12, atol=1e-12)


def test_flex_backend_matches_oracle():
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = (torch.randn(2, 150, 2, 16) for _ in range(3))
    plan = SparsePlan.from_dense(torch.rand(2, 2, 5, 5) < 0.5, block_q=32, block_k=32, seq_q=150, seq_k=150,
                                 kv_block_valid=torch.tensor([32, 20, 32, 32, 5], dtype=torch.int32))
    plan = plan.with_epilogue(torch.rand(2, 2, 150), torch.randn(2, 150, 2, 16))
    ref, ref_lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="torch")
    out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="flex")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_sdpa_backend_for_dense_plans():
    q, k, v = (torch.randn(1, 100, 2, 16) for _ in range(3))
    plan = SparsePlan.dense(seq_q=100, seq_k=100, block_q=32, block_k=32)
    inputs = AttentionInputs(q, k, v, plan, 0.25, False)
    assert choose_backend(inputs).name == "sdpa"
    assert choose_backend(AttentionInputs(q, k, v, plan, 0.25, True)).name == "torch"  # LSE needs a sparse backend
    sparse = SparsePlan.from_dense(torch.rand(1, 1, 4, 4) < 0.5, block_q=32, block_k=32, seq_q=100, seq_k=100)
    assert choose_backend(AttentionInputs(q, k, v, sparse, 0.25, False)).name == "torch"
    epi = plan.with_epilogue(torch.rand(1, 2, 100), torch.randn(1, 100, 2, 16))
    torch.testing.assert_close(block_sparse_attention(q, k, v, epi, backend="sdpa"),
                               block_sparse_attention(q, k, v, epi, backend="torch"), rtol=1e-5, atol=1e-5)


def test_dense_attention_lse_helper():
    q, k, v = (torch.randn(1, 90, 2, 16, dtype=torch.float64) for _ in range(3))
    out, lse = dense_attention_lse(q, k, v, block_q=32, block_k=32)
    torch.testing.assert_close(out, sdpa(q, k, v))
    torch.testing.assert_close(lse, torch.logsumexp(torch.einsum("bshd,bthd->bhst", q, k) / 4, -1))


def test_explicit_backend_that_cannot_run_lists_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 64, 2, 16, dtype=torch.float64) for _ in range(3))
    plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=16, block_k=16)
    with pytest.raises(NotImplementedError, match="backend='triton'.*\n.*TRITON_INTERPRET.*\n.*float64"):
        block_sparse_attention(q, k, v, plan, backend="triton")
    with pytest.raises(NotImplementedError, match="not all-dense|return_lse"):
        block_sparse_attention(q, k, v, plan, backend="sdpa", return_lse=True)
    with pytest.raises(ValueError, match="Unknown backend"):
        block_sparse_attention(q, k, v, plan, backend="cuda-magic")


def test_backend_context_and_env(monkeypatch):
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=16, block_k=16)
    inputs = AttentionInputs(q, k, v, plan, 0.25, False)
    with dit_sparse.use_backend("torch"):
        assert choose_backend(inputs).name == "torch"
    assert choose_backend(inputs).name == "sdpa"
    monkeypatch.setenv("DIT_SPARSE_BACKEND", "torch")
    assert choose_backend(inputs).name == "torch"


def test_triton_refuses_unsupported_head_dim():
    q, k, v = (torch.randn(1, 32, 1, 320) for _ in range(3))
    plan = SparsePlan.dense(seq_q=32, seq_k=32, block_q=16, block_k=16)
    with pytest.raises(NotImplementedError, match="head_dim 320"):
        block_sparse_attention(q, k, v, plan, backend="triton")


def test_triton_refuses_grad():
    q = torch.randn(1, 32, 1, 16, requires_grad=True)
    plan = SparsePlan.dense(seq_q=32, seq_k=32, block_q=16, block_k=16)
    with pytest.raises(NotImplementedError, match="no_grad"):
        block_sparse_attention(q, q.detach(), q.detach(), plan, backend="triton")


@pytest.mark.parametrize("case,exc,match", [
    ("dtype", ValueError, "share one dtype"),
    ("int", ValueError, "not supported.*Cast"),
    ("ndim", ValueError, r"transpose\(1, 2\)"),
    ("shape", ValueError, "Shape mismatch"),
    ("length", ValueError, "build a new plan"),
    ("heads", ValueError, "cannot serve"),
    ("device", ValueError, r"plan.to\(query.device\)"),
    ("plan", ValueError, "SparsePlan.from_dense"),
])
def test_bad_inputs_name_the_fix(case, exc, match):
    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=16, block_k=16)
    if case == "dtype":
        k = k.half()
    elif case == "int":
        q = k = v = torch.ones(1, 64, 2, 16, dtype=torch.int32)
    elif case == "ndim":
        q = q[0]
    elif case == "shape":
        k = torch.randn(1, 64, 3, 16)
    elif case == "length":
        plan = SparsePlan.dense(seq_q=80, seq_k=64, block_q=16, block_k=16)
    elif case == "heads":
        plan = SparsePlan.from_dense(torch.ones(1, 3, 4, 4, dtype=torch.bool), block_q=16, block_k=16)
    elif case == "device":
        plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=16, block_k=16, device="meta")
    elif case == "plan":
        plan = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, plan)
