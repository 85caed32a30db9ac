"""What only the Hopper kernel has: the full/partial block split, conditional softmax rescaling, the TMA-or-pointer
choice, the cached split on the plan, and the ``hopper`` backend's reasons. CPU runs use the Triton interpreter,
which executes descriptor loads as masked loads (the TMA hardware and warp specialisation are not exercised
here). The oracle is the float64 torch reference."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dit_sparse  # noqa: E402
from dit_sparse.backends import BACKENDS, AttentionInputs, choose_backend  # noqa: E402
from dit_sparse.backends.hopper import HopperBackend  # noqa: E402
from dit_sparse.kernels.block_sparse_attn_hopper import (  # noqa: E402
    MAX_RESCALE_THRESHOLD,
    HopperOptions,
    block_sparse_attn_hopper_fwd,
    kernel_path,
    tma_reasons,
)
from dit_sparse.plan import SparsePlan  # noqa: E402
from dit_sparse.reference.attention import block_sparse_attention_reference  # noqa: E402
from dit_sparse.segment import PooledSegment  # noqa: E402
from tests.sync_guard import no_host_sync  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET or not CUDA else "cuda"
needs_kernel = pytest.mark.skipif(
    not (INTERPRET or (CUDA and torch.cuda.get_device_capability()[0] >= 9)),
    reason="needs the Triton interpreter (TRITON_INTERPRET=1 before import) or an sm90+ GPU")
TOL = 2e-5 if DEV == "cpu" else 1e-4  # fp32; the GPU's exp2 is approximate


def _run(q, k, v, plan, scale, options=None):
    b, h = q.shape[0], q.shape[2]
    tables = tuple(t.expand(b, h, *t.shape[2:]) for t in plan.full_split)
    return block_sparse_attn_hopper_fwd(q, k, v, *tables, block_q=plan.block_q, block_k=plan.block_k,
                                        kv_block_valid=plan.kv_block_valid, scale=scale, options=options)


def _oracle(q, k, v, plan, scale):
    out, lse = block_sparse_attention_reference(q.double(), k.double(), v.double(), plan, scale=scale,
                                                return_lse=True)
    return out, lse


def _assert_matches(out, lse, want, want_lse, tol=TOL):
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = ~torch.isneginf(want_lse)
    torch.testing.assert_close(lse.double()[fin], want_lse[fin], atol=tol, rtol=tol)


def _qkv(gen, b, sq, sk, h, d, dtype=torch.float32):
    return tuple(torch.randn(b, s, h, d, generator=gen).to(DEV, dtype) for s in (sq, sk, sk))


# ------------------------------------------------------------------------------------------ full / partial split
SPLIT_CASES = {
    # rows mix full blocks and partial ones (padding slots, a pure-padding block, the ragged tail)
    "mixed": dict(seq_k=150, valid=[32, 20, 32, 0, 22], density=0.7),
    # no key block is full: every block carries padding
    "all_partial": dict(seq_k=150, valid=[31, 20, 30, 5, 22], density=0.8),
    # every key block is full: no padding, seq_k a multiple of the block
    "all_full": dict(seq_k=160, valid=None, density=0.6),
}


@needs_kernel
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_full_partial_split_paths(case):
    """Each split shape against the float64 oracle, with every switch setting: results equal to the bit between
    the split and the all-masked loops (the mask is all true on full blocks) and between TMA and pointer loads
    (same values, same order); close with and without conditional rescaling."""
    c = SPLIT_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    b, h, sq, d, blk = 1, 2, 70, 16, 32
    mk = -(-c["seq_k"] // blk)
    mask = torch.rand(b, h, -(-sq // blk), mk, generator=gen) < c["density"]
    mask[0, 0, 0] = True  # one row reads everything
    valid = None if c["valid"] is None else torch.tensor(c["valid"], dtype=torch.int32, device=DEV)
    plan = SparsePlan.from_dense(mask.to(DEV), block_q=blk, block_k=blk, seq_q=sq, seq_k=c["seq_k"],
                                 kv_block_valid=valid)
    full_num, _, part_num, _ = plan.full_split
    if case == "mixed":
        assert bool(((full_num > 0) & (part_num > 0)).any())
    elif case == "all_partial":
        assert int(full_num.sum()) == 0 and int(part_num.sum()) > 0
    else:
        assert int(part_num.sum()) == 0 and int(full_num.sum()) > 0
    q, k, v = _qkv(gen, b, sq, c["seq_k"], h, d)
    want, want_lse = _oracle(q, k, v, plan, 0.3)
    runs = {}
    for name, opts in {"default": HopperOptions(), "pointer": HopperOptions(tma=False),
                       "masked": HopperOptions(split_full=False), "always": HopperOptions(rescale_threshold=0.0),
                       "always_masked_pointer": HopperOptions(split_full=False, rescale_threshold=0.0, tma=False),
                       }.items():
        runs[name] = _run(q, k, v, plan, 0.3, opts)
        _assert_matches(*runs[name], want, want_lse)
    for a, bb in (("default", "pointer"), ("default", "masked"), ("always", "always_masked_pointer")):
        assert torch.equal(runs[a][0], runs[bb][0]) and torch.equal(runs[a][1], runs[bb][1]), (a, bb)


# ------------------------------------------------------------------------------------------ conditional rescaling
def _growth_inputs(dtype):
    """Logits of 100-150 (nats) whose block maxima grow along the key blocks (all full, read in ascending order)
    by steps below and above the threshold: the rows of the first query tile read feature 0, whose block maxima
    grow by <= 1.5 nats a block (< 8 log2 units: no rescale); the rows of the second read feature 1, growing by
    10-25 nats (14-36 log2 units). An overflow of exp, or a final normalisation on another max, shows at once."""
    blk, nblocks, d, h = 16, 4, 16, 1
    sq, sk = 2 * blk, nblocks * blk
    gen = torch.Generator().manual_seed(11)
    q = 0.05 * torch.randn(1, sq, h, d, generator=gen)
    q[0, :blk, 0, 0], q[0, :blk, 0, 1] = 1.0, 0.0
    q[0, blk:, 0, 0], q[0, blk:, 0, 1] = 0.0, 1.0
    k = 0.05 * torch.randn(1, sk, h, d, generator=gen)
    small, big = [118.0, 119.0, 119.5, 121.0], [100.0, 110.0, 125.0, 150.0]
    for j in range(nblocks):
        rows = slice(j * blk, (j + 1) * blk)
        k[0, rows, 0, 0] = torch.linspace(small[j] - 3, small[j], blk)[torch.randperm(blk, generator=gen)]
        k[0, rows, 0, 1] = torch.linspace(big[j] - 3, big[j], blk)[torch.randperm(blk, generator=gen)]
    v = torch.randn(1, sk, h, d, generator=gen)
    return (t.to(DEV, dtype) for t in (q, k, v)), blk


@needs_kernel
@pytest.mark.parametrize("threshold", [0.0, 8.0, MAX_RESCALE_THRESHOLD], ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conditional_rescaling_is_exact(threshold, dtype):
    (q, k, v), blk = _growth_inputs(dtype)
    plan = SparsePlan.dense(seq_q=q.shape[1], seq_k=k.shape[1], block_q=blk, block_k=blk, device=DEV)
    # the inputs really hold tiles on both sides of the threshold (tile-wide max growth, log2 units)
    logits = torch.einsum("qd,kd->qk", q[0, :, 0].double(), k[0, :, 0].double()) * math.log2(math.e)
    block_max = logits.view(2, blk, -1, blk).amax(-1)             # [tile, row, key block]
    growth = (block_max[..., 1:] - block_max[..., :-1].cummax(-1).values).clamp(min=0).amax(1)  # [tile, step]
    assert bool((growth[0] < 8).all()) and bool((growth[1] > 15).any()) and bool((growth[1] < 15).any())
    assert float(logits.max()) > 150  # exp of these overflows fp32 without the max
    out, lse = _run(q, k, v, plan, 1.0, HopperOptions(rescale_threshold=threshold))
    want, want_lse = _oracle(q, k, v, plan, 1.0)
    # logits of ~150 carry fp32 rounding of ~1e-5 nats into every exp (the inputs' precision, not the rescale's):
    # 1e-4 in fp32; a normalisation on the wrong max or a missed rescale is off by orders of magnitude
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    _assert_matches(out, lse, want, want_lse, tol=tol)


def _jump_inputs(jump: float, pooled: bool):
    """fp16 inputs whose base-2 logits (scale ln 2: ``qk_scale`` is exactly 1) are exactly 0 on the first key
    block and jump by exactly ``jump`` on one key of the second (``pooled``: on one pooled key, log count 0),
    the largest jump that conditional rescaling at ``threshold = jump`` lets through on a stale max: that key's
    probability is ``2**jump`` when rounded to fp16 for ``p @ v`` (inf at 16). Small integers: every dot is exact."""
    blk, d = 16, 16
    q = torch.zeros(1, blk, 1, d)
    q[0, :, 0, 0] = 1.0
    k = torch.zeros(1, 2 * blk, 1, d)
    v = torch.randn(1, 2 * blk, 1, d, generator=torch.Generator().manual_seed(4))
    segment = None
    if pooled:
        keys = torch.zeros(1, 1, 3, d)
        keys[0, 0, 1, 0] = jump
        segment = PooledSegment(keys=keys, values=torch.randn(1, 1, 3, d, generator=torch.Generator().manual_seed(5)),
                                log_count=torch.zeros(3), read=torch.ones(1, 1, 1, 3, dtype=torch.bool))
    else:
        k[0, blk + 3, 0, 0] = jump
    return q.half(), k.half(), v.half(), segment, blk


@needs_kernel
@pytest.mark.parametrize("pooled", [False, True], ids=["exact_key", "pooled_key"])
def test_largest_threshold_keeps_fp16_probabilities_finite(pooled):
    """At the largest threshold HopperOptions accepts, a logit jump of exactly the threshold (no rescale: the test
    is ``>``) gives ``p = 2**threshold``, rounded to fp16 for ``p @ v``: finite only while the threshold is < 16
    (65504 is fp16's largest value). Against the float64 oracle."""
    q, k, v, segment, blk = _jump_inputs(MAX_RESCALE_THRESHOLD, pooled)
    scale = math.log(2.0)  # base-2 logits = q . k
    plan = SparsePlan.dense(seq_q=q.shape[1], seq_k=k.shape[1], block_q=blk, block_k=blk, device=DEV)
    b, h = 1, 1
    tables = tuple(t.expand(b, h, *t.shape[2:]) for t in plan.full_split)
    seg = {} if segment is None else dict(pooled_keys=segment.keys, pooled_values=segment.values,
                                         pooled_log_count=segment.log_count, pooled_read=segment.read)
    out, lse = block_sparse_attn_hopper_fwd(q, k, v, *tables, block_q=blk, block_k=blk, scale=scale,
                                            options=HopperOptions(rescale_threshold=MAX_RESCALE_THRESHOLD), **seg)
    want, want_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(), plan, scale=scale,
                                                      return_lse=True, pooled=segment)
    assert bool(torch.isfinite(out).all()), "p overflowed fp16"
    _assert_matches(out, lse, want, want_lse, tol=2e-3)
    with pytest.raises(ValueError, match=r"\[0, 15\].*65504"):
        HopperOptions(rescale_threshold=16.0)


# ------------------------------------------------------------------------------------------ TMA or pointer loads
@needs_kernel
def test_tma_falls_back_to_pointer_loads_and_says_why():
    gen = torch.Generator().manual_seed(3)
    plan = SparsePlan.dense(seq_q=40, seq_k=40, block_q=16, block_k=16, device=DEV)
    q, k, v = _qkv(gen, 1, 40, 40, 2, 18)  # fp32, D = 18: a 72-byte row stride is not 16-byte aligned
    assert tma_reasons(q, k, v) and "pointer loads" in kernel_path(q, k, v)
    with pytest.raises(ValueError, match="tma=True.*not multiples of 16 bytes"):
        _run(q, k, v, plan, 0.3, HopperOptions(tma=True))
    _assert_matches(*_run(q, k, v, plan, 0.3), *_oracle(q, k, v, plan, 0.3))
    # a storage offset of one element: the slice base is not 16-byte aligned
    q2, k2, v2 = _qkv(gen, 1, 40, 40, 2, 16)
    k2 = torch.cat([torch.zeros(1, device=DEV), k2.flatten()])[1:].view_as(k2)
    assert any("16-byte aligned" in r for r in tma_reasons(q2, k2, v2))
    _assert_matches(*_run(q2, k2, v2, plan, 0.3), *_oracle(q2, k2, v2, plan, 0.3))
    assert tma_reasons(q2, *_qkv(gen, 1, 40, 40, 2, 16)[1:]) == []  # the aligned case takes descriptors
    # the backend names the reason when tma=True is asked for and cannot be served
    backend = HopperBackend(HopperOptions(tma=True))
    reasons = backend.not_supported_reasons(AttentionInputs(q, k, v, plan, 0.3, False))
    assert any("tma=True" in r for r in reasons)


# ------------------------------------------------------------------------------------------ plan cache, sync-free
def test_full_split_is_cached_sync_free_and_survives_epilogues():
    gen = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 3, 4, 5, generator=gen) < 0.5
    plan = SparsePlan.from_dense(mask, block_q=16, block_k=16, seq_q=60, seq_k=70,
                                 kv_block_valid=torch.tensor([16, 3, 16, 16, 6], dtype=torch.int32))
    with no_host_sync("SparsePlan.full_split"):
        split = plan.full_split
    assert plan.full_split is split
    for got, want in zip(split, plan.split_full()):
        assert torch.equal(got, want)
    again = plan.with_epilogue(out_scale=torch.ones(2, 3, 60))
    assert again.full_split is split and again.without_epilogue().full_split is split
    other = SparsePlan.from_dense(mask, block_q=16, block_k=16, seq_q=60, seq_k=70)  # other blocks: own split
    assert not torch.equal(other.full_split[0], split[0])


# ------------------------------------------------------------------------------------------ the backend
class _FakeCuda:
    """Stands in for a CUDA tensor in ``not_supported_reasons`` (which reads device, dtype, shape, grad only)."""

    def __init__(self, shape=(1, 64, 2, 64)):
        self.shape, self.dtype, self.requires_grad, self.is_cuda = shape, torch.bfloat16, False, True
        self.device = torch.device("cuda", 0)


def test_backend_reasons_and_dispatch(monkeypatch):
    plan = SparsePlan.dense(seq_q=64, seq_k=64, block_q=16, block_k=16)
    order = list(BACKENDS)
    assert order.index("sdpa") < order.index("hopper") == order.index("triton") - 1  # right before the portable one
    fake = _FakeCuda()
    inputs = AttentionInputs(fake, fake, fake, plan, 0.1, True)
    hopper = BACKENDS["hopper"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert any("compute capability 8.0 < 9.0" in r for r in hopper.not_supported_reasons(inputs))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert hopper.not_supported_reasons(inputs) == [] and hopper.auto_reasons(inputs) == []
    assert hopper.auto is False  # never compiled on a GPU yet: named only until the GPU suite has run it
    # CPU: never picked automatically; named, it runs in the interpreter (or says why not)
    q = torch.randn(1, 64, 2, 16)
    cpu = AttentionInputs(q, q, q, SparsePlan.from_dense(torch.ones(1, 1, 4, 4, dtype=torch.bool), block_q=16,
                                                         block_k=16), 0.1, True)
    assert choose_backend(cpu).name == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="hopper.*\n.*TRITON_INTERPRET"):
        choose_backend(cpu, "hopper")
    with pytest.raises(NotImplementedError, match="float64"):
        choose_backend(AttentionInputs(q.double(), q.double(), q.double(), cpu.plan, 0.1, True), "hopper")
    with pytest.raises(ValueError, match="HopperOptions"):
        HopperBackend().options = "fast"


@needs_kernel
def test_backend_named_runs_and_logs_its_path(caplog, monkeypatch):
    gen = torch.Generator().manual_seed(9)
    q, k, v = _qkv(gen, 1, 50, 50, 2, 16)
    mask = torch.rand(1, 2, 4, 4, generator=gen) < 0.6
    plan = SparsePlan.from_dense(mask.to(DEV), block_q=16, block_k=16, seq_q=50, seq_k=50)
    with caplog.at_level("DEBUG", logger="dit_sparse.backends"):
        out, lse = dit_sparse.block_sparse_attention(q, k, v, plan, scale=0.25, return_lse=True, backend="hopper")
    assert any("hopper kernel: TMA descriptors" in r.getMessage() for r in caplog.records)
    _assert_matches(out, lse, *_oracle(q, k, v, plan, 0.25))
    # a fresh plan (its split computed inside the call) runs without a device-to-host sync
    fresh = SparsePlan.from_dense((torch.rand(1, 2, 4, 4, generator=gen) < 0.5).to(DEV), block_q=16, block_k=16,
                                  seq_q=50, seq_k=50)
    with no_host_sync("a hopper backend call"):
        dit_sparse.block_sparse_attention(q, k, v, fresh, scale=0.25, backend="hopper")
    # the switches, set on the registered backend, reach the kernel (the logged path says pointer loads)
    monkeypatch.setattr(BACKENDS["hopper"], "_options", HopperOptions(tma=False, rescale_threshold=0.0))
    with caplog.at_level("DEBUG", logger="dit_sparse.backends"):
        again = dit_sparse.block_sparse_attention(q, k, v, plan, scale=0.25, backend="hopper")
    assert any("pointer loads (tma=False)" in r.getMessage() and "rescale every step" in r.getMessage()
               for r in caplog.records)
    torch.testing.assert_close(again, out, atol=TOL, rtol=TOL)
