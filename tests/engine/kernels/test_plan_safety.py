"""Memory safety and backend agreement of the op on inputs the fast path must not misread.

* Non-unit head-dim stride (``x[..., ::2]``): the Triton backend copies such inputs (it used to read them wrong).
* Malformed hand-built CSR plans with checks off (counts above the width, negative or out-of-range indices,
  duplicates, unsorted rows): the Triton kernels (portable and Hopper; interpreter on CPU) and the torch backend
  read the same blocks,
  the rule of ``dit_sparse.plan`` (count clamped, an entry read only when in range and above every entry read
  before it), checked against an independent per-row Python oracle; and ``DIT_SPARSE_CHECKS=1`` rejects them.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dit_sparse import SparsePlan, block_sparse_attention  # noqa: E402
from dit_sparse.reference.attention import block_sparse_attention_reference  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not CUDA else "cuda"
needs_kernel = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs the Triton interpreter "
                                  "(TRITON_INTERPRET=1 before import) or a CUDA GPU")

B, H, BLOCK, SEQ, D = 1, 2, 16, 72, 16  # Mq = Mk = 5, the last key block partial (8 tokens)
MK = -(-SEQ // BLOCK)


def _qkv(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, SEQ, H, D, generator=g, dtype=dtype).to(DEV) for _ in range(3))


def _oracle_mask(num: torch.Tensor, idx: torch.Tensor, mk: int) -> torch.Tensor:
    """Independent per-row reading of the CSR rule (Python loops): bool [B, H, Mq, Mk]."""
    b, h, mq, w = idx.shape
    out = torch.zeros(b, h, mq, mk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for m in range(mq):
                top = -1
                for e in range(min(max(int(num[bi, hi, m]), 0), w)):
                    j = int(idx[bi, hi, m, e])
                    if 0 <= j < mk and j > top:
                        out[bi, hi, m, j] = True
                        top = j
    return out


def _malformed_plans():
    """(name, kv_num_blocks [B, H, Mq], kv_indices [B, H, Mq, W]) with one defect each, plus a clean row mix."""
    g = torch.Generator().manual_seed(7)
    base = torch.stack([torch.randperm(MK, generator=g)[:4].sort().values for _ in range(B * H * MK)])
    base = base.view(B, H, MK, 4).to(torch.int32)
    num = torch.full((B, H, MK), 3, dtype=torch.int32)
    cases = []
    n = num.clone()
    n[0, 0, 1] = 9          # count above the width (4): used to read past the row
    n[0, 1, 2] = -3         # negative count
    cases.append(("count_past_width", n, base.clone()))
    i = base.clone()
    i[0, 0, 0, 0] = -1      # negative index: used to give NaN
    i[0, 1, 3, 1] = -(2**31)
    cases.append(("negative_index", num, i))
    i = base.clone()
    i[0, 0, 2, 2] = MK      # one past the last key block
    i[0, 1, 4, 0] = 10**6
    cases.append(("index_out_of_range", num, i))
    i = base.clone()
    i[0, 0, 1, :3] = torch.tensor([2, 2, 2])     # duplicates: read once by both backends
    i[0, 1, 0, :3] = torch.tensor([1, 3, 3])
    cases.append(("duplicates", num, i))
    i = base.clone()
    i[0, 0, 3, :3] = torch.tensor([3, 0, 4])     # unsorted: the ascending run of maxima (3, 4)
    i[0, 1, 1, :4] = torch.tensor([4, 1, 2, 0])
    cases.append(("unsorted", torch.full_like(num, 4), i))
    return cases


@needs_kernel
def test_triton_copies_non_unit_stride_inputs():
    """x[..., ::2] has stride 2 on the head dim: the kernel assumed 1 (relative error 0.9 before the fix)."""
    g = torch.Generator().manual_seed(0)
    wide = [torch.randn(B, SEQ, H, 2 * D, generator=g).to(DEV) for _ in range(3)]
    q, k, v = (t[..., ::2] for t in wide)
    assert q.stride(-1) == 2
    mask = torch.rand(B, H, MK, MK, generator=g) < 0.6
    plan = SparsePlan.from_dense(mask.to(DEV), block_q=BLOCK, block_k=BLOCK, seq_q=SEQ, seq_k=SEQ)
    out, lse = block_sparse_attention(q, k, v, plan, backend="triton", return_lse=True)
    ref, ref_lse = block_sparse_attention_reference(*(t.contiguous() for t in (q, k, v)), plan, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("name,num,idx", [pytest.param(*c, id=c[0]) for c in _malformed_plans()])
def test_malformed_plans_read_in_bounds_and_backends_agree(name, num, idx, monkeypatch):
    monkeypatch.setenv("DIT_SPARSE_CHECKS", "0")
    q, k, v = _qkv(1)
    valid = torch.tensor([16, 9, 16, 0, 8], dtype=torch.int32)
    plan = SparsePlan(num.to(DEV), idx.to(DEV), BLOCK, BLOCK, SEQ, SEQ, valid.to(DEV))
    expected = _oracle_mask(num, idx, MK)
    assert torch.equal(plan.to_dense().cpu(), expected)
    good = SparsePlan.from_dense(expected.to(DEV), block_q=BLOCK, block_k=BLOCK, seq_q=SEQ, seq_k=SEQ,
                                 kv_block_valid=valid.to(DEV))
    ref, ref_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(), good, return_lse=True)
    for backend in ("torch", "triton", "hopper"):
        out, lse = block_sparse_attention(q, k, v, plan, backend=backend, return_lse=True)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5, msg=f"{name} {backend}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5, msg=f"{name} {backend}")
    if DEV == "cpu":  # compiled flex on CPU returns no LSE: the output alone
        out = block_sparse_attention(q, k, v, plan, backend="compiled")
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5, msg=f"{name} compiled")
    monkeypatch.setenv("DIT_SPARSE_CHECKS", "1")
    with pytest.raises(ValueError, match="kv_num_blocks must lie|kv_indices must lie|strictly ascending"):
        block_sparse_attention(q, k, v, plan, backend="torch")


@needs_kernel
def test_kernel_alone_clamps_malformed_rows():
    """The launcher on its own (no op, no validation): counts past the width and wild indices stay in bounds."""
    from dit_sparse.kernels.block_sparse_attn import block_sparse_attn_fwd

    q, k, v = _qkv(2)
    num = torch.full((B, H, MK), 2**30, dtype=torch.int32)  # every row claims far more entries than it has
    idx = torch.tensor([-5, 0, 0, 3, 2**31 - 1], dtype=torch.int32).expand(B, H, MK, 5).contiguous()
    out, lse = block_sparse_attn_fwd(q, k, v, num.to(DEV), idx.to(DEV), block_q=BLOCK, block_k=BLOCK, scale=0.25)
    good = SparsePlan.from_dense(_oracle_mask(num, idx, MK).to(DEV), block_q=BLOCK, block_k=BLOCK, seq_q=SEQ,
                                 seq_k=SEQ)
    ref, ref_lse = block_sparse_attention_reference(q, k, v, good, scale=0.25, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("tma", [False, None], ids=["pointer", "tma"])
def test_hopper_kernel_alone_stays_in_bounds(tma):
    """The Hopper launcher fed garbage full/partial lists (its contract is split_full's well-formed lists): counts
    past the width, wild indices, and a "full" list naming the ragged last block. k / v are views into a buffer
    that is NaN past the keys, so any read past them would turn the output NaN."""
    from dit_sparse.kernels.block_sparse_attn_hopper import HopperOptions, block_sparse_attn_hopper_fwd

    q, k, v = _qkv(3)
    buf = torch.full((2, B, 2 * SEQ, H, D), float("nan"), device=DEV)
    buf[:, :, :SEQ] = torch.stack([k, v])
    k, v = buf[0, :, :SEQ], buf[1, :, :SEQ]
    num = torch.full((B, H, MK), 2**30, dtype=torch.int32)  # far more entries than the width
    idx = torch.tensor([-5, MK - 1, 2**31 - 1, MK, 3], dtype=torch.int32).expand(B, H, MK, 5).contiguous()
    num, idx = num.to(DEV), idx.to(DEV)
    out, lse = block_sparse_attn_hopper_fwd(q, k, v, num, idx, num, idx, block_q=BLOCK, block_k=BLOCK, scale=0.25,
                                            options=HopperOptions(tma=tma))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_cheap_invariants_are_checked_at_construction():
    num = torch.ones(1, 1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"1 <= W <= Mk=2"):  # wider than the key blocks
        SparsePlan(num, torch.zeros(1, 1, 2, 3, dtype=torch.int32), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="int32"):
        SparsePlan(num, torch.zeros(1, 1, 2, 2, dtype=torch.int64), 16, 16, 32, 32)
    with pytest.raises(ValueError, match="kv_block_valid must be int32"):
        SparsePlan(num, torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, 16, 32, 32,
                   kv_block_valid=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_scale must be a floating-point"):
        SparsePlan(num, torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, 16, 32, 32,
                   out_scale=torch.ones(1, 1, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="known_dense must be a bool"):
        SparsePlan(num, torch.zeros(1, 1, 2, 2, dtype=torch.int32), 16, 16, 32, 32, known_dense=1)


def test_validate_checks_block_valid_and_dense_flag():
    plan = SparsePlan.dense(seq_q=32, seq_k=32, block_q=16, block_k=16)
    plan.validate()
    with pytest.raises(ValueError, match="kv_block_valid must lie"):
        SparsePlan.dense(seq_q=32, seq_k=32, block_q=16, block_k=16,
                         kv_block_valid=torch.tensor([16, 17], dtype=torch.int32)).validate()
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1, 0] = False
    lie = SparsePlan.from_dense(mask, block_q=16, block_k=16)
    lie = SparsePlan(lie.kv_num_blocks, lie.kv_indices, 16, 16, 32, 32, known_dense=True)
    with pytest.raises(ValueError, match="known_dense"):
        lie.validate()


def test_from_dense_width_is_the_key_block_count():
    """Fixed width (flex BlockMask): building a plan never reads the longest row back to the host."""
    mask = torch.zeros(2, 3, 4, 7, dtype=torch.bool)
    mask[..., 2] = True
    plan = SparsePlan.from_dense(mask, block_q=16, block_k=16)
    assert plan.kv_indices.shape == (2, 3, 4, 7)
    assert torch.equal(plan.to_dense(), mask)
