"""SparsePlan: CSR round trips, density, validation, flex conversion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import SparsePlan


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), mq=st.integers(1, 9), mk=st.integers(1, 9),
       p=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_from_dense_round_trip(b, h, mq, mk, p, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, mq, mk, generator=g) < p
    plan = SparsePlan.from_dense(mask, block_q=16, block_k=32)
    assert torch.equal(plan.to_dense(), mask)
    assert torch.equal(plan.kv_num_blocks, mask.sum(-1).int())
    plan.validate()
    # CSR rows: ascending indices of the True columns
    for bi in range(b):
        for hi in range(h):
            for m in range(mq):
                n = int(plan.kv_num_blocks[bi, hi, m])
                assert plan.kv_indices[bi, hi, m, :n].tolist() == torch.nonzero(mask[bi, hi, m]).view(-1).tolist()


def test_density_counts_real_tokens():
    mask = torch.tensor([[[[True, False], [True, True]]]])
    plan = SparsePlan.from_dense(mask, block_q=4, block_k=4, seq_q=6, seq_k=6)
    # rows 0-3 read keys 0-3 (4 keys); rows 4-5 read all 6 keys
    assert plan.density == pytest.approx((4 * 4 + 2 * 6) / 36)
    assert plan.sparsity() == pytest.approx(1 - plan.density)
    padded = SparsePlan.from_dense(mask, block_q=4, block_k=4, kv_block_valid=torch.tensor([3, 2], dtype=torch.int32))
    # self-attention over a permuted layout: queries in padding slots do not count either
    assert padded.density == pytest.approx((3 * 3 + 2 * 5) / (5 * 5))
    assert not padded.keys_all_valid and plan.keys_all_valid


def test_dense_plan():
    plan = SparsePlan.dense(seq_q=100, seq_k=70, block_q=32, block_k=16)
    assert plan.is_dense and plan.density == 1.0
    assert plan.shape == (1, 1, 4, 5)


def test_repr_is_readable():
    plan = SparsePlan.dense(seq_q=100, seq_k=100, block_q=64, block_k=64)
    text = repr(plan.with_epilogue(out_scale=torch.ones(1, 1, 100)))
    assert "Mq=2" in text and "density=100.00%" in text and "out_scale" in text


def test_getitem_and_expand():
    mask = torch.rand(2, 3, 4, 4) < 0.5
    plan = SparsePlan.from_dense(mask, block_q=16, block_k=16)
    assert torch.equal(plan[1].to_dense(), mask[1:2])
    assert torch.equal(plan[1, 2].to_dense(), mask[1:2, 2:3])
    num, idx = SparsePlan.from_dense(mask[:1, :1], block_q=16, block_k=16).expand(2, 3)
    assert num.shape == (2, 3, 4) and idx.stride(0) == 0
    with pytest.raises(ValueError, match="cannot serve"):
        plan.expand(4, 3)


def test_epilogue_granularity():
    plan = SparsePlan.dense(seq_q=100, seq_k=100, block_q=64, block_k=64)
    assert plan.with_epilogue(out_scale=torch.ones(1, 1, 2)).scale_per_block
    assert not plan.with_epilogue(out_scale=torch.ones(1, 1, 100)).scale_per_block
    assert plan.with_epilogue(out_bias=torch.ones(1, 2, 1, 8)).bias_per_block
    assert not plan.with_epilogue(out_bias=torch.ones(1, 100, 1, 8)).bias_per_block
    with pytest.raises(ValueError, match="out_scale"):
        plan.with_epilogue(out_scale=torch.ones(1, 1, 7))
    with pytest.raises(ValueError, match="out_bias"):
        plan.with_epilogue(out_bias=torch.ones(1, 7, 1, 8))


def test_from_dense_errors_name_the_fix():
    with pytest.raises(ValueError, match="torch.bool"):
        SparsePlan.from_dense(torch.ones(1, 1, 2, 2), block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"mask\[None, None\]"):
        SparsePlan.from_dense(torch.ones(2, 2, dtype=torch.bool), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="does not fit"):
        SparsePlan.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_q=16, block_k=16, seq_q=100)
    with pytest.raises(ValueError, match="int32"):
        SparsePlan(torch.ones(1, 1, 2, dtype=torch.int64), torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="positive int"):
        SparsePlan.dense(seq_q=0, seq_k=10)


def test_validate_catches_bad_content():
    num = torch.tensor([[[2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="ascending"):
        SparsePlan(num, torch.tensor([[[[1, 0]]]], dtype=torch.int32), 16, 16, 16, 32).validate()
    with pytest.raises(ValueError, match="kv_indices must lie"):
        SparsePlan(num, torch.tensor([[[[0, 5]]]], dtype=torch.int32), 16, 16, 16, 32).validate()


def test_to_flex_matches_plan():
    mask = torch.rand(1, 2, 3, 4) < 0.5
    plan = SparsePlan.from_dense(mask, block_q=32, block_k=32, seq_q=90, seq_k=110)
    flex = plan.to_flex()
    assert torch.equal(flex.to_dense().bool()[..., :4], mask)


def test_to_flex_compiled_form_lists_full_and_partial_blocks():
    mask = torch.rand(1, 2, 3, 4) < 0.6
    valid = torch.tensor([32, 10, 32, 32], dtype=torch.int32)
    plan = SparsePlan.from_dense(mask, block_q=32, block_k=32, seq_q=90, seq_k=128, kv_block_valid=valid)
    flex = plan.to_flex(eager_safe=False)
    assert torch.equal(flex.to_dense().bool()[..., :4], mask)
    # only key block 1 carries padding: it is the only partial block, every other listed block is full
    assert torch.equal(flex.kv_num_blocks, mask[..., 1].int())
    assert torch.equal(flex.full_kv_num_blocks, (mask & (valid == 32)).sum(-1).int())


def _loop_split(num, idx, mk, whole):
    """Independent per-row Python reading of the CSR rule, split by key-block wholeness: two lists per row."""
    b, h, mq, w = idx.shape
    full, part = {}, {}
    for key in [(bi, hi, m) for bi in range(b) for hi in range(h) for m in range(mq)]:
        top, f, p = -1, [], []
        for e in range(min(max(int(num[key]), 0), w)):
            j = int(idx[key + (e,)])
            if 0 <= j < mk and j > top:
                (f if whole[j] else p).append(j)
                top = j
        full[key], part[key] = f, p
    return full, part


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 2), mq=st.integers(1, 5), mk=st.integers(1, 7),
       w=st.integers(1, 7), block=st.sampled_from([16, 32]), tail=st.integers(1, 32), padded=st.booleans(),
       seed=st.integers(0, 2**16))
def test_split_full_matches_loop_oracle(b, h, mq, mk, w, block, tail, padded, seed):
    """Full / partial split of any plan (malformed rows included): exactly the entries the read rule reads,
    each row ascending, blocks with padding slots or the ragged tail partial, zero past the count."""
    w = min(w, mk)
    tail = min(tail, block)
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(-1, w + 2, (b, h, mq), generator=g, dtype=torch.int32)
    idx = torch.randint(-1, mk + 1, (b, h, mq, w), generator=g, dtype=torch.int32)
    valid = (torch.randint(1, block + 1, (mk,), generator=g, dtype=torch.int32)
             .where(torch.rand(mk, generator=g) < 0.4, torch.tensor(block, dtype=torch.int32)) if padded else None)
    seq_k = (mk - 1) * block + tail
    plan = SparsePlan(num, idx, block_q=block, block_k=block, seq_q=mq * block, seq_k=seq_k, kv_block_valid=valid)
    whole = [(block if j < mk - 1 else tail) == block and (valid is None or int(valid[j]) == block)
             for j in range(mk)]
    full, part = _loop_split(num, idx, mk, whole)
    fn, fi, pn, pi = plan.split_full()
    assert fi.shape == pi.shape == idx.shape and fn.dtype == fi.dtype == torch.int32
    for key, want in full.items():
        assert int(fn[key]) == len(want) and fi[key][:len(want)].tolist() == want
        assert int(pn[key]) == len(part[key]) and pi[key][:len(part[key])].tolist() == part[key]
        assert not fi[key][len(want):].any() and not pi[key][len(part[key]):].any()


def test_split_full_builds_without_a_host_sync():
    from tests.sync_guard import no_host_sync

    mask = torch.rand(2, 3, 5, 6) < 0.5
    valid = torch.tensor([32, 32, 7, 32, 32, 32], dtype=torch.int32)
    plan = SparsePlan.from_dense(mask, block_q=32, block_k=32, seq_q=150, seq_k=180, kv_block_valid=valid)
    with no_host_sync():
        fn, fi, pn, pi = plan.split_full()
    assert torch.equal(fn + pn, mask.sum(-1).int())
