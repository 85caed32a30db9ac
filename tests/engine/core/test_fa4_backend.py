"""The ``fa4`` backend (flash-attn-4): plan conversion, reasons, dispatch; the GPU comparison skips without one.

The conversion to FA4's block-sparse tensors is pure torch and is checked exactly on CPU. The FA4 call itself
needs flash-attn-4 and a Hopper/Blackwell GPU: ``test_gpu_fa4_matches_reference`` (``gpu`` mark) runs it there.
``test_fa4_compiles_in_fake_mode`` compiles the real call (tensors, ``mask_mod``) for sm_90 / sm_100 on a CPU
machine where flash-attn-4 is installed, and skips where it is not.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dit_sparse import SparsePlan, block_sparse_attention
from dit_sparse.backends import BACKENDS, AttentionInputs, available_backends, choose_backend, fa4
from dit_sparse.reference.attention import block_sparse_attention_reference
from dit_sparse.segment import PooledSegment
from tests.sync_guard import no_host_sync
from tests.utils import TOLERANCES

CUDA = torch.cuda.is_available()


def _rows(cnt: torch.Tensor, idx: torch.Tensor, mk: int) -> torch.Tensor:
    """Bool ``[B, H, Mq, Mk]`` of the listed entries, after checking each row is strictly ascending in range."""
    out = torch.zeros(*cnt.shape, mk, dtype=torch.bool)
    for key in torch.cartesian_prod(*(torch.arange(s) for s in cnt.shape)).reshape(-1, 3).tolist():
        row = idx[tuple(key)][:int(cnt[tuple(key)])].tolist()
        assert row == sorted(set(row)) and all(0 <= j < mk for j in row), f"row {key}: {row}"
        out[tuple(key)][row] = True
    return out


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), bcast_b=st.booleans(), bcast_h=st.booleans(),
       mq=st.integers(1, 4), mk=st.integers(1, 6), w=st.integers(1, 6), block=st.sampled_from([16, 32]),
       tail=st.integers(1, 32), padded=st.booleans(), malformed=st.booleans(), seed=st.integers(0, 2**16))
def test_fa4_tensors_describe_exactly_the_blocks_read(b, h, bcast_b, bcast_h, mq, mk, w, block, tail, padded,
                                                        malformed, seed):
    """Full blocks + partial blocks = ``plan.to_dense()`` (disjoint), full ones exactly the read blocks without a
    padding slot or ragged tail (``key_block_whole``), rows ascending; ``key_valid`` marks exactly the real keys;
    built without a host sync. Malformed rows (hand-built tables) are read by the plan's one rule."""
    g = torch.Generator().manual_seed(seed)
    w, tail = min(w, mk), min(tail, block)
    pb, ph = 1 if bcast_b else b, 1 if bcast_h else h
    if malformed:
        num = torch.randint(-1, w + 2, (pb, ph, mq), generator=g, dtype=torch.int32)
        idx = torch.randint(-1, mk + 1, (pb, ph, mq, w), generator=g, dtype=torch.int32)
    else:
        mask = torch.rand(pb, ph, mq, mk, generator=g) < 0.5
        plan0 = SparsePlan.from_dense(mask, block_q=block, block_k=block)
        num, idx = plan0.kv_num_blocks, plan0.kv_indices
    valid = None
    if padded:  # some blocks with padding slots, one possibly pure padding
        valid = torch.randint(0, block + 1, (mk,), generator=g, dtype=torch.int32)
        valid = valid.where(torch.rand(mk, generator=g) < 0.5, torch.tensor(block, dtype=torch.int32))
    seq_k = (mk - 1) * block + tail
    plan = SparsePlan(num, idx, block_q=block, block_k=block, seq_q=mq * block - 3 if mq > 1 else mq * block,
                      seq_k=seq_k, kv_block_valid=valid)

    with no_host_sync("fa4_tensors"):
        t = fa4.fa4_tensors(plan)

    assert t.block_size == (block, block)
    for cnt, ix in ((t.full_cnt, t.full_idx), (t.mask_cnt, t.mask_idx)):
        assert cnt.dtype == ix.dtype == torch.int32 and cnt.shape == (pb, ph, mq) and ix.shape[:3] == (pb, ph, mq)
        assert ix.shape[-1] <= mk and ix.stride(-1) == 1  # FA4: compact width <= Mk, unit stride rows
    full, part = _rows(t.full_cnt, t.full_idx, mk), _rows(t.mask_cnt, t.mask_idx, mk)
    whole = plan.key_block_whole()
    assert not (full & part).any()
    assert torch.equal(full | part, plan.to_dense())
    assert not (full & ~whole).any() and not (part & whole).any()

    if valid is None:
        assert t.key_valid is None
    else:
        keys = torch.arange(seq_k)
        want = (keys % block) < valid[keys // block]
        assert t.key_valid.dtype == torch.int32 and t.key_valid.shape == (seq_k,)
        assert torch.equal(t.key_valid.bool(), want)


def _emulate_fa4(q, k, v, t: fa4.FA4Tensors, scale: float, return_lse: bool):
    """FA4's block-sparse semantics in float64 torch: full blocks read every key below ``seq_k``, partial
    ("mask") blocks also run the key-validity ``mask_mod``; empty rows give 0 and lse = -inf."""
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    bq, bk = t.block_size
    qb, kb = torch.arange(sq) // bq, torch.arange(sk) // bk
    kv = torch.ones(sk, dtype=torch.bool) if t.key_valid is None else t.key_valid.bool()
    full = _rows(t.full_cnt, t.full_idx, -(-sk // bk)).expand(b, hq, -1, -1)
    part = _rows(t.mask_cnt, t.mask_idx, -(-sk // bk)).expand(b, hq, -1, -1)
    allowed = full[:, :, qb][..., kb] | (part[:, :, qb][..., kb] & kv)
    s = torch.einsum("bshd,bthd->bhst", q.double(), k.double()) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(-1e300)).nan_to_num(0.0)
    out = torch.einsum("bhst,bthd->bshd", p, v.double()).to(q.dtype)
    return out, (lse.float() if return_lse else None)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("epi", [None, "row", "block"])
def test_forward_on_fa4_semantics_equals_reference(monkeypatch, padded, epi):
    """``FA4Backend.forward`` with FA4's call replaced by its documented semantics (full blocks unmasked, partial
    blocks masked) reproduces the reference: the split is safe to run unmasked, the epilogue and lse are wired."""
    g = torch.Generator().manual_seed(7)
    b, h, sq, sk, d, blk = 2, 3, 100, 150, 16, 32
    mask = torch.rand(1, h, 4, 5, generator=g) < 0.6
    mask[0, 0, 0] = False  # an empty row
    valid = torch.tensor([32, 0, 17, 32, 32], dtype=torch.int32) if padded else None  # block 1: pure padding
    plan = SparsePlan.from_dense(mask, block_q=blk, block_k=blk, seq_q=sq, seq_k=sk, kv_block_valid=valid)
    if epi == "row":
        plan = plan.with_epilogue(torch.rand(b, h, sq, generator=g) + 0.5, torch.randn(b, sq, h, d, generator=g,
                                                                                         dtype=torch.float64))
    elif epi == "block":
        plan = plan.with_epilogue(torch.rand(1, h, 4, generator=g) + 0.5, torch.randn(b, 4, h, d, generator=g,
                                                                                        dtype=torch.float64))
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64) for n in (sq, sk, sk))
    monkeypatch.setattr(fa4, "run_fa4", _emulate_fa4)
    scale = 1 / math.sqrt(d)
    for return_lse in (False, True):
        out, lse = fa4.FA4Backend().forward(AttentionInputs(q, k, v, plan, scale, return_lse))
        ref = block_sparse_attention_reference(q, k, v, plan, scale=scale, return_lse=return_lse)
        ref_out, ref_lse = ref if return_lse else (ref, None)
        torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
        if return_lse:
            torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-6, atol=1e-6)
        else:
            assert lse is None


@pytest.mark.parametrize("cap,bq,bk,seq_q,ok", [
    ((9, 0), 128, 128, 4096, True), ((9, 0), 256, 128, 4096, True), ((9, 0), 64, 128, 4096, False),
    ((9, 0), 128, 64, 4096, False), ((9, 0), 128, 256, 4096, False),
    ((10, 0), 256, 128, 4096, True), ((10, 0), 256, 256, 4096, True), ((10, 0), 128, 128, 4096, False),
    ((10, 0), 128, 128, 100, True), ((10, 0), 256, 64, 4096, False), ((10, 3), 512, 128, 4096, True),
    ((8, 0), 128, 128, 4096, False), ((12, 0), 128, 128, 4096, False),
], ids=str)
def test_tile_rules_per_architecture(cap, bq, bk, seq_q, ok):
    reasons = fa4.tile_reasons(cap, bq, bk, seq_q)
    assert (reasons == []) == ok, reasons
    if not ok:  # says what to do: another GPU, or the block sizes to build the plan with
        assert "Hopper (9.x) and Blackwell (10.x)" in reasons[0] if cap[0] not in (9, 10) else \
            "build the plan with block_q=" in reasons[0]


@pytest.mark.parametrize("d,dv,ok", [(128, 128, True), (64, 64, True), (8, 8, True), (72, 72, True),
                                     (256, 256, False), (60, 60, False), (128, 64, False), (4, 4, False)])
def test_head_dim_rule(d, dv, ok):
    assert (fa4.head_dim_reasons(d, dv) == []) == ok


def _inputs(dtype=torch.bfloat16, d=64, grad=False, pooled=None):
    q, k, v = (torch.randn(1, 256, 2, d, dtype=dtype, requires_grad=grad) for _ in range(3))
    plan = SparsePlan.from_dense(torch.tensor([[[[True, False], [True, True]]]]), block_q=128, block_k=128)
    return AttentionInputs(q, k, v, plan, 0.125, False, pooled)


def test_named_fa4_on_cpu_says_why(monkeypatch):
    """Named, it raises NotImplementedError listing every reason with its fix; automatic dispatch skips it."""
    monkeypatch.setattr(fa4, "has_fa4", lambda: False)
    inputs = _inputs()
    with pytest.raises(NotImplementedError, match=r"(?s)backend='fa4'.*pip install --pre flash-attn-4.*92 MB.*"
                                                  r"README.*tensors are on cpu: FA4 runs on CUDA"):
        block_sparse_attention(inputs.query, inputs.key, inputs.value, inputs.plan, backend="fa4")
    monkeypatch.setattr(fa4, "has_fa4", lambda: True)  # installed: the device is still a reason
    assert available_backends(inputs)["fa4"] == ["tensors are on cpu: FA4 runs on CUDA GPUs only (Hopper or "
                                                 "Blackwell)"]
    assert choose_backend(inputs).name == "torch"
    reasons = " | ".join(available_backends(_inputs(torch.float32, d=256, grad=True))["fa4"])
    for what in ("dtype torch.float32", "no_grad", "head_dim 256"):
        assert what in reasons


def test_fa4_refuses_a_pooled_segment(monkeypatch):
    monkeypatch.setattr(fa4, "has_fa4", lambda: True)
    seg = PooledSegment(keys=torch.randn(1, 2, 3, 64), values=torch.randn(1, 2, 3, 64),
                        log_count=torch.zeros(3), read=torch.ones(1, 2, 2, 3, dtype=torch.bool))
    assert any("pooled key segment" in r for r in available_backends(_inputs(pooled=seg))["fa4"])
    # named, the refusal says why and names the backends that run the segment (what to type instead)
    inputs = _inputs(pooled=seg)
    with pytest.raises(NotImplementedError) as err:
        choose_backend(inputs, "fa4")
    msg = str(err.value)
    assert "backend 'fa4' does not read a pooled key segment" in msg and "combine='row'" in msg
    assert "fp32" in msg and "gate" in msg
    for fix in ("backend='triton'", "backend='hopper'", "backend='torch'", "combine='block'"):
        assert fix in msg, fix
    assert BACKENDS["fa4"].segment_reasons(_inputs()) == []  # no segment: nothing about it


def test_fa4_is_registered_after_sdpa_and_opt_in():
    names = list(BACKENDS)
    assert names.index("sdpa") < names.index("fa4") < names.index("triton")
    assert BACKENDS["fa4"].auto is False  # unmeasured: named only until the GPU suite has run it


def test_fa4_compiles_in_fake_mode():
    """With flash-attn-4 installed (no GPU needed): FA4 compiles our call, key-validity mask_mod included, for
    sm_90 and sm_100 in its fake-tensor mode, and refuses the block sizes :func:`tile_reasons` refuses."""
    if not fa4.has_fa4():
        pytest.skip("flash-attn-4 is not installed (pip install --pre flash-attn-4)")
    script = Path(__file__).with_name("fa4_fake_compile.py")
    for arch in ("90", "100"):  # FA4 reads the architecture once per process
        res = subprocess.run([sys.executable, str(script), arch], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.count("compiled") == 2 and res.stdout.count("refused") == 1, res.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and fa4.has_fa4()), reason="needs a CUDA GPU and flash-attn-4 "
                    "(pip install --pre flash-attn-4)")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_gpu_fa4_matches_reference(padded):
    """bf16, D=128, ragged lengths, broadcast heads, an empty row, an epilogue; with ``padded`` one key block has
    padding slots and one is pure padding. FA4 against the torch reference (fp32 math on the bf16 inputs)."""
    cap = torch.cuda.get_device_capability()
    if cap[0] not in (9, 10):
        pytest.skip(f"FA4's block-sparse forward needs Hopper or Blackwell, this GPU is {cap}")
    bq = 128 if cap[0] == 9 else 256
    g = torch.Generator().manual_seed(3)
    b, h, d, sq, sk = 2, 3, 128, 5 * bq - 37, 9 * 128 - 50
    mq, mk = -(-sq // bq), -(-sk // 128)
    mask = torch.rand(1, h, mq, mk, generator=g) < 0.4
    mask[0, 0, 0] = False
    mask[0, -1, -1] = True
    valid = None
    if padded:
        valid = torch.full((mk,), 128, dtype=torch.int32)
        valid[2], valid[4], valid[-1] = 70, 0, 128 - 50
        mask[0, 1, 1, 4] = True
        mask[0, 1, 1, :4] = False  # a row that reads only the pure-padding block: out 0, lse -inf
        mask[0, 1, 1, 5:] = False
    plan = SparsePlan.from_dense(mask, block_q=bq, block_k=128, seq_q=sq, seq_k=sk, kv_block_valid=valid).to("cuda")
    plan = plan.with_epilogue(torch.rand(b, h, sq, generator=g).cuda() + 0.5,
                              torch.randn(b, mq, h, d, generator=g).cuda())
    q, k, v = (torch.randn(b, n, h, d, generator=g).cuda().to(torch.bfloat16) for n in (sq, sk, sk))
    q = (q.float() * 2).to(torch.bfloat16)  # peakier softmax, so the tolerance means something
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, plan, return_lse=True, backend="fa4")
    ref, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), plan, return_lse=True)
    atol, rtol = TOLERANCES[torch.bfloat16]
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    torch.testing.assert_close(lse[~empty], ref_lse[~empty], atol=atol, rtol=rtol)
