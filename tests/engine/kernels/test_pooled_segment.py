"""The pooled key segment (docs/rectification.md#row-combine): one pass, in the Triton kernel and the torch reference.

Checked three ways: the kernel against the torch reference on raw random segments; the one-pass row rectification
(``row_rectified_attention``) against today's two-pass form (sparse ``(out, lse)`` merged with
``pooled_remainder``) and against the float64 single-softmax oracle, on awkward layouts (text before / after,
partial edge tiles, dense heads), fuzzed with hypothesis. CPU runs use the Triton interpreter (blocks of 16).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dit_sparse  # noqa: E402
from dit_sparse import TokenLayout  # noqa: E402
from dit_sparse.methods.base import forced_mask  # noqa: E402
from dit_sparse.methods.pooled_rectification import (  # noqa: E402
    PooledRectificationConfig,
    block_statistics,
    pooled_segment,
    row_rectified_attention,
)
from dit_sparse.plan import SparsePlan  # noqa: E402
from dit_sparse.reference.attention import block_sparse_attention_reference  # noqa: E402
from dit_sparse.reference.rectification import row_rectified_attention_reference  # noqa: E402
from dit_sparse.segment import PooledSegment  # noqa: E402
from tests.utils import TOLERANCES  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not CUDA else "cuda"
needs_kernel = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs the Triton interpreter "
                                  "(TRITON_INTERPRET=1 before import) or a CUDA GPU")
TOL = {**TOLERANCES, **({torch.float32: (1e-4, 1e-4)} if DEV == "cuda" else {})}


def _cdiv(a, b):
    return -(-a // b)


def _random_segment(gen, batch, heads, mq, npooled, dim, *, gate: bool, bcast: bool = False):
    b, h = (1, 1) if bcast else (batch, heads)
    keys = torch.randn(b, h, npooled, dim, generator=gen)
    values = torch.randn(b, h, npooled, dim, generator=gen)
    log_count = torch.rand(npooled, generator=gen) * 3.0
    read = torch.rand(b, h, mq, npooled, generator=gen) < 0.6
    read[..., 0, :] = True  # the first query block reads every pooled key
    g = 0.5 * torch.randn(b, h, npooled, dim, generator=gen) if gate else None
    return PooledSegment(keys=keys.to(DEV), values=values.to(DEV), log_count=log_count.to(DEV), read=read.to(DEV),
                         gate=None if g is None else g.to(DEV))


def _run_both(q, k, v, plan, seg, scale, backend="triton"):
    got = dit_sparse.block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True, backend=backend,
                                            pooled=seg)
    want = dit_sparse.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), scale=scale,
                                             return_lse=True, backend="torch", pooled=None if seg is None else
                                             PooledSegment(**{f: (None if getattr(seg, f) is None else
                                                                  getattr(seg, f).cpu())
                                                              for f in ("keys", "values", "log_count", "read",
                                                                        "gate")}))
    return got, want


# ---------------------------------------------------------------------------------------------------- kernel level
KERNELS = [pytest.param("triton", id="portable"),
           pytest.param("hopper", id="hopper", marks=pytest.mark.skipif(
               DEV == "cuda" and torch.cuda.get_device_capability()[0] < 9, reason="the Hopper kernel needs sm90+"))]


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("gate", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("seq,npooled,dim,bcast", [(70, 5, 16, False), (96, 37, 24, True), (33, 16, 32, False)])
def test_kernel_matches_reference(seq, npooled, dim, bcast, gate, backend):
    gen = torch.Generator().manual_seed(seq + npooled)
    batch, heads, bq = 2, 2, 16
    mq = _cdiv(seq, bq)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen).to(DEV) for _ in range(3))
    mask = torch.rand(batch, heads, mq, mq, generator=gen) < 0.4
    mask[0, 0, 1] = False  # a row with no exact key: the pooled keys alone
    plan = SparsePlan.from_dense(mask.to(DEV), block_q=bq, block_k=bq, seq_q=seq, seq_k=seq)
    seg = _random_segment(gen, batch, heads, mq, npooled, dim, gate=gate, bcast=bcast)
    (out, lse), (want, want_lse) = _run_both(q, k, v, plan, seg, 0.37, backend)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out.cpu(), want, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=atol, rtol=rtol)
    # the segment changed something, and a read mask of all False is exactly no segment
    plain = dit_sparse.block_sparse_attention(q, k, v, plan, scale=0.37, return_lse=True, backend=backend)
    assert (plain[0] - out).abs().max() > 1e-2
    off = PooledSegment(keys=seg.keys, values=seg.values, log_count=seg.log_count,
                        read=torch.zeros_like(seg.read), gate=seg.gate)
    none = dit_sparse.block_sparse_attention(q, k, v, plan, scale=0.37, return_lse=True, backend=backend,
                                             pooled=off)
    assert torch.equal(none[0], plain[0]) and torch.equal(none[1], plain[1])


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS)
def test_kernel_bf16_and_epilogue(backend):
    gen = torch.Generator().manual_seed(4)
    batch, heads, seq, dim, bq = 1, 2, 48, 32, 16
    mq = _cdiv(seq, bq)
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen).to(DEV) for _ in range(3))
    plan = SparsePlan.from_dense((torch.rand(batch, heads, mq, mq, generator=gen) < 0.5).to(DEV), block_q=bq,
                                 block_k=bq, seq_q=seq, seq_k=seq)
    plan = plan.with_epilogue(out_scale=torch.rand(batch, heads, mq, generator=gen).to(DEV) + 0.5,
                              out_bias=torch.randn(batch, mq, heads, dim, generator=gen).to(DEV))
    seg = _random_segment(gen, batch, heads, mq, 9, dim, gate=True)
    (out, lse), (want, want_lse) = _run_both(q, k, v, plan, seg, 0.2, backend)  # fp32: epilogue after the softmax
    torch.testing.assert_close(out.cpu(), want, atol=2e-5, rtol=2e-5)
    bf = tuple(t.bfloat16() for t in (q, k, v))
    (out, lse), (want, want_lse) = _run_both(*bf, plan, seg, 0.2, backend)
    atol, rtol = TOL[torch.bfloat16]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), want.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------------- precision
#: unit roundoff of each 16-bit input dtype (round to nearest: half a unit in the last place, relative)
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _large_logit_case(gen, dtype, seq, dim, npooled):
    """q, k, v in ``dtype`` (v ~ N(0, 1)) whose logits q . k * scale have std 8 at scale 1 / sqrt(D) (|q|, |k|
    ~ 2.8 sqrt(D): about 16 at D 32), so the largest reach about ±30 as a DiT's do; a plan with a ragged tail and a
    padded key block; a segment of fp32 keys of the same size (never representable in ``dtype``), fp32 values, a
    gate that closes about a third of the reads."""
    batch, heads, bq = 1, 2, 16
    mq = _cdiv(seq, bq)
    sig = math.sqrt(8.0)
    q, k = (sig * torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(2))
    v = torch.randn(batch, seq, heads, dim, generator=gen)
    valid = torch.full((mq,), bq, dtype=torch.int32)
    valid[1] = bq - 5  # padding slots in a middle block
    mask = torch.rand(batch, heads, mq, mq, generator=gen) < 0.5
    mask[..., 0] = True  # every row reads a real key
    plan = SparsePlan.from_dense(mask, block_q=bq, block_k=bq, seq_q=seq, seq_k=seq, kv_block_valid=valid)
    seg = PooledSegment(keys=sig * torch.randn(batch, heads, npooled, dim, generator=gen),
                        values=torch.randn(batch, heads, npooled, dim, generator=gen),
                        log_count=torch.rand(npooled, generator=gen) * 3.0,
                        read=torch.rand(batch, heads, mq, npooled, generator=gen) < 0.7,
                        gate=0.7 * sig * torch.randn(batch, heads, npooled, dim, generator=gen))
    return tuple(t.to(dtype) for t in (q, k, v)), plan, seg


@pytest.mark.parametrize("backend", ["torch", *KERNELS])
@pytest.mark.parametrize("dtype,seq,dim,npooled", [(torch.bfloat16, 50, 40, 21), (torch.float16, 37, 64, 19)],
                         ids=["bf16", "fp16"])
def test_segment_logits_at_exact_precision(backend, dtype, seq, dim, npooled):
    """The pooled logits are as precise as the exact ones: against the float64 oracle of the contract (the inputs
    as the op sees them, the segment's fp32 keys / values as they are), the output error with the segment stays
    within 2x the exact part's alone (+ 1/16 of the dtype's epsilon at the output's size), with logits up to ±30;
    the lse error within the fp32 round-off of the pooled dot products (the split's residual u^2 and the fp32
    accumulation, bound from the data) on top of 2x the exact part's. Rounding the fp32 pooled keys to the input
    dtype moves such a logit by up to 30 u (bf16: 0.12), many times the exact part's error."""
    if backend != "torch" and not (INTERPRET or CUDA):
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1 before import) or a CUDA GPU")
    gen = torch.Generator().manual_seed(seq * dim + npooled)
    (q, k, v), plan, seg = _large_logit_case(gen, dtype, seq, dim, npooled)
    scale = 1.0 / math.sqrt(dim)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    pooled_logits = scale * (q64.transpose(1, 2) @ seg.keys.double().transpose(-1, -2))
    assert pooled_logits.abs().max() > 20.0  # the regime this test is about
    seg_dev = PooledSegment(**{f: getattr(seg, f).to(DEV) for f in ("keys", "values", "log_count", "read", "gate")})
    err, lse_err = {}, {}
    for name, s, s_dev in (("exact", None, None), ("segment", seg, seg_dev)):
        want, want_lse = block_sparse_attention_reference(q64, k64, v64, plan, scale=scale, return_lse=True,
                                                          pooled=s)
        got, got_lse = dit_sparse.block_sparse_attention(q.to(DEV), k.to(DEV), v.to(DEV), plan.to(DEV),
                                                         scale=scale, return_lse=True, backend=backend,
                                                         pooled=s_dev)
        assert got.dtype == dtype
        err[name] = float((got.cpu().double() - want).abs().max())
        lse_err[name] = float((got_lse.cpu().double() - want_lse).abs().max())
        floor = torch.finfo(dtype).eps * float(want.abs().max()) / 16
    assert err["segment"] <= 2 * err["exact"] + floor, (err, floor)
    u = _UNIT_ROUNDOFF[dtype]
    dot_bound = scale * float((q64.abs().transpose(1, 2) @ seg.keys.double().abs().transpose(-1, -2)).max()) \
        * (2 * u * u + 2 * (dim + 2) * 2.0 ** -24)
    assert lse_err["segment"] <= 2 * lse_err["exact"] + dot_bound, (lse_err, dot_bound)


def test_segment_validation_and_backends():
    gen = torch.Generator().manual_seed(0)
    seg = _random_segment(gen, 1, 2, 3, 4, 16, gate=False)
    with pytest.raises(ValueError, match="log_count"):
        PooledSegment(keys=seg.keys, values=seg.values, log_count=seg.log_count[:2], read=seg.read)
    with pytest.raises(ValueError, match="bool"):
        PooledSegment(keys=seg.keys, values=seg.values, log_count=seg.log_count, read=seg.read.float())
    with pytest.raises(ValueError, match="float32"):
        PooledSegment(keys=seg.keys.double(), values=seg.values, log_count=seg.log_count, read=seg.read)
    q = k = v = torch.randn(1, 48, 2, 16, device=DEV)
    plan = SparsePlan.dense(seq_q=48, seq_k=48, block_q=16, block_k=16, device=DEV)
    with pytest.raises(ValueError, match="query blocks"):
        dit_sparse.block_sparse_attention(q, k, v, SparsePlan.dense(seq_q=48, seq_k=48, block_q=32, block_k=16,
                                                                    device=DEV), pooled=seg)
    with pytest.raises(ValueError, match="head dims"):
        dit_sparse.block_sparse_attention(q[..., :8], k[..., :8], v[..., :8], plan, pooled=seg, backend="torch")
    with pytest.raises(NotImplementedError, match="pooled key segment"):
        dit_sparse.block_sparse_attention(q, k, v, plan, pooled=seg, backend="sdpa")
    # automatic dispatch never sends a segment to a backend that would drop it (dense plan -> not SDPA)
    out = dit_sparse.block_sparse_attention(q, k, v, plan, pooled=seg)
    want = dit_sparse.block_sparse_attention(q, k, v, plan, pooled=seg, backend="torch")
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------------------------------- method level
LAYOUTS = {
    "text_before_partial": TokenLayout(frames=2, height=6, width=7, text_tokens=11, text_position="before",
                                       tile=(1, 4, 4)),
    "text_after_partial": TokenLayout(frames=3, height=5, width=4, text_tokens=20, text_position="after",
                                      tile=(1, 4, 4)),
    "no_text": TokenLayout(frames=2, height=5, width=5, tile=(2, 2, 4)),
}


def _random_mask(layout, batch, heads, density, seed, dense_heads=()):
    g = torch.Generator().manual_seed(seed)
    n = layout.num_blocks
    mask = (torch.rand(batch, heads, n, n, generator=g) < density) | forced_mask(layout, diagonal=False)
    mask[:, list(dense_heads)] = True
    return mask


def _qkv(layout, batch, heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, layout.seq_len, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    q = q + 0.8 * torch.randn(1, 1, heads, dim, generator=g, dtype=torch.float64)
    return q, k, v


def _three_ways(layout, batch, heads, dim, density, gapr, seed, dense_heads=(), scale=None, row_keys="mean",
                backend="triton", row_outliers=1):
    """Fused kernel, the second form (two-pass merge for "mean"; the torch one-pass for "outlier") and the
    float64 oracle."""
    q, k, v = _qkv(layout, batch, heads, dim, seed)
    qp, kp, vp = (layout.permute(t.float()).to(DEV) for t in (q, k, v))
    mask = _random_mask(layout, batch, heads, density, seed, dense_heads)
    cfg = PooledRectificationConfig(combine="row", gapr=gapr, row_keys=row_keys, row_outliers=row_outliers)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    outliers = row_outliers if row_keys == "outlier" else 0
    stats = block_statistics(qp, kp, vp, layout, outliers=outliers)
    fused, lse = row_rectified_attention(qp, kp, vp, layout, mask.to(DEV), cfg, scale, stats=stats,
                                         backend=backend, return_lse=True)
    stats_c = block_statistics(qp.cpu(), kp.cpu(), vp.cpu(), layout, outliers=outliers)
    two, two_lse = row_rectified_attention(qp.cpu(), kp.cpu(), vp.cpu(), layout, mask, cfg, scale, stats=stats_c,
                                           backend="torch", two_pass=not outliers, return_lse=True)
    ref = row_rectified_attention_reference(q, k, v, layout, mask, scale=scale, gapr=gapr, row_keys=row_keys,
                                            row_outliers=row_outliers)
    return layout, fused.cpu(), lse.cpu(), two, two_lse, ref


def _assert_agree(layout, fused, lse, two, two_lse, ref):
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(layout.unpermute(fused), layout.unpermute(two), atol=atol, rtol=rtol)
    torch.testing.assert_close(layout.unpermute(fused).double(), ref, atol=atol, rtol=rtol)
    lse_m = layout.unpermute(lse.transpose(1, 2).unsqueeze(-1))
    two_m = layout.unpermute(two_lse.transpose(1, 2).unsqueeze(-1))
    torch.testing.assert_close(lse_m, two_m, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_segment_built_in_fp32_from_16bit_tokens(dtype):
    """The segment's means of 16-bit tokens are float32 sums (not 16-bit ones): the pooled keys, values and gate
    of ``pooled_segment`` from bf16 / fp16 q, k, v equal the float64 means of the same tokens within float32
    accumulation round-off (a 16-bit mean would be off by up to 2^-8 / 2^-11 of it). Tokens share a large per-block
    offset, so the means are as large as the tokens and not representable in the input dtype."""
    layout = LAYOUTS["text_before_partial"]
    g = torch.Generator().manual_seed(31)
    b, h, d = 1, 2, 24
    nv, bs = layout.num_video_blocks, layout.block_size
    offset = 10.0 * torch.randn(1, layout.num_blocks, 1, h, d, generator=g)
    qp, kp, vp = ((offset + torch.randn(b, layout.num_blocks, bs, h, d, generator=g)).reshape(b, -1, h, d)
                  for _ in range(3))
    qp, kp, vp = (layout.permute(layout.unpermute(t).to(dtype)) for t in (qp, kp, vp))  # zero padding slots
    stats = block_statistics(qp, kp, vp, layout)
    seg = pooled_segment(layout, torch.eye(layout.num_blocks, dtype=torch.bool),
                         PooledRectificationConfig(combine="row", row_keys="mean", gapr=True), stats=stats)
    n = layout.block_valid()[:nv].double().view(1, nv, 1, 1)
    real = (torch.arange(bs).view(1, bs) < layout.block_valid()[:nv].view(nv, 1)).double().view(1, nv, bs, 1, 1)

    def blocks(t):
        return t[:, : nv * bs].double().reshape(b, nv, bs, h, d)

    k_mean = blocks(kp).sum(2) / n
    want = {"keys": k_mean, "values": blocks(vp).sum(2) / n,
            "gate": ((blocks(kp) - k_mean.unsqueeze(2)).abs() * real).sum(2) / n}
    for name, w in want.items():
        got = getattr(seg, name).double()
        bound = bs * 2.0 ** -23 * float(blocks(kp if name != "values" else vp).abs().max())
        assert float((got - w.transpose(1, 2)).abs().max()) <= bound, name


@needs_kernel
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("gapr", [True, False], ids=["gapr", "naive"])
def test_fused_row_equals_two_pass_and_oracle(name, gapr):
    _assert_agree(*_three_ways(LAYOUTS[name], 2, 3, 16, 0.35, gapr, seed=5, dense_heads=(1,)))


@needs_kernel
@pytest.mark.parametrize("backend", KERNELS[1:])
@pytest.mark.parametrize("name", ["text_before_partial", "text_after_partial"])
def test_fused_row_hopper_kernel(name, backend):
    """The per-row rectification through the Hopper kernel (full/partial split on packed layouts with text)."""
    _assert_agree(*_three_ways(LAYOUTS[name], 2, 3, 16, 0.35, True, seed=6, dense_heads=(1,), backend=backend))


@needs_kernel
@pytest.mark.parametrize("name", ["text_before_partial", "no_text"])
def test_fused_outlier_keys_equal_oracle(name):
    """row_keys="outlier": each skipped block as its most deviating key exactly + the mean of the rest."""
    _assert_agree(*_three_ways(LAYOUTS[name], 1, 2, 16, 0.3, True, seed=8, dense_heads=(1,), row_keys="outlier"))


@needs_kernel
@pytest.mark.parametrize("row_outliers", [2, 3])
def test_fused_several_outliers_equal_oracle(row_outliers):
    """row_outliers > 1: the M most deviating keys of each skipped block exactly + the mean of the rest, through
    the kernel (the segment's (M + 1) Nv keys, read mask repeated per rank); partial edge tiles included."""
    _assert_agree(*_three_ways(LAYOUTS["text_before_partial"], 1, 2, 16, 0.3, True, seed=11, dense_heads=(1,),
                               row_keys="outlier", row_outliers=row_outliers))


@needs_kernel
@settings(deadline=None, max_examples=10, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.integers(1, 3), height=st.integers(1, 9), width=st.integers(1, 9),
       tile=st.sampled_from([(1, 4, 4), (2, 2, 4), (1, 2, 8)]), text=st.integers(0, 20), before=st.booleans(),
       heads=st.integers(1, 2), dense_head=st.booleans(), density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
       gapr=st.booleans(), dim=st.sampled_from([16, 24]), row_keys=st.sampled_from(["mean", "outlier"]),
       row_outliers=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_fused_row_fuzz(frames, height, width, tile, text, before, heads, dense_head, density, gapr, dim, row_keys,
                        row_outliers, seed):
    layout = TokenLayout(frames=frames, height=height, width=width, text_tokens=text,
                         text_position="before" if before else "after", tile=tile)
    dense_heads = (0,) if dense_head else ()
    _assert_agree(*_three_ways(layout, 1, heads, dim, density, gapr, seed, dense_heads, scale=0.3,
                               row_keys=row_keys, row_outliers=row_outliers))


def test_torch_one_pass_equals_two_pass():
    """The torch backend's one pass (no kernel) against the two-pass merge, float64 inputs: tight."""
    layout = LAYOUTS["text_after_partial"]
    q, k, v = _qkv(layout, 2, 2, 8, seed=9)
    qp, kp, vp = (layout.permute(t) for t in (q, k, v))
    mask = _random_mask(layout, 2, 2, 0.3, seed=9, dense_heads=(0,))
    cfg = PooledRectificationConfig(combine="row", row_keys="mean")
    stats = block_statistics(qp, kp, vp, layout)
    one = row_rectified_attention(qp, kp, vp, layout, mask, cfg, 0.4, stats=stats, backend="torch", return_lse=True)
    two = row_rectified_attention(qp, kp, vp, layout, mask, cfg, 0.4, stats=stats, backend="torch", two_pass=True,
                                  return_lse=True)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[1].float(), two[1].float(), atol=1e-5, rtol=1e-5)
    seg = pooled_segment(layout, mask, cfg, stats=stats)
    nv = layout.num_video_blocks
    assert not seg.read[:, :, nv:].any() and not seg.read[:, 0].any()  # text rows and the dense head read none
    with pytest.raises(ValueError, match="two_pass"):
        row_rectified_attention(qp, kp, vp, layout, mask, PooledRectificationConfig(combine="row"), 0.4,
                                stats=stats, backend="torch", two_pass=True)
    with pytest.raises(ValueError, match="outliers=config.row_outliers"):
        pooled_segment(layout, mask, PooledRectificationConfig(combine="row"), stats=stats)
    with pytest.raises(ValueError, match="outliers=3"):  # stats with one outlier per block, config wants three
        pooled_segment(layout, mask, PooledRectificationConfig(combine="row", row_outliers=3),
                       stats=block_statistics(qp, kp, vp, layout, outliers=1))
