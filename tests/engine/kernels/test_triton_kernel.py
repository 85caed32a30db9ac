"""The Triton block-sparse attention forwards against the torch reference: the portable kernel and the Hopper
kernel (``kernel`` fixture; the Hopper kernel reads the plan as ``SparsePlan.full_split``).

On CPU the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, set below before the kernel module is
imported; ``tests/conftest.py`` does the same). The interpreter costs ~5 ms per program x key sub-tile, so CPU
cases stay at a few hundred tokens. With CUDA and ``TRITON_INTERPRET=0`` the same small cases run compiled on the
GPU (``DEV``), plus the GPU-only cases (real shapes, bf16/fp16, 64-bit offsets), which skip without CUDA.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dit_sparse.kernels.block_sparse_attn import block_sparse_attn_fwd  # noqa: E402
from dit_sparse.kernels.block_sparse_attn_hopper import HopperOptions, block_sparse_attn_hopper_fwd  # noqa: E402
from dit_sparse.plan import SparsePlan  # noqa: E402
from dit_sparse.reference.attention import block_sparse_attention_reference  # noqa: E402
from tests.utils import TOLERANCES  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# the small cases run in the Triton interpreter on CPU, or compiled on the GPU when CUDA is there and
# TRITON_INTERPRET is not 1
DEV = "cpu" if INTERPRET or not CUDA else "cuda"
needs_kernel = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs the Triton interpreter "
                                  "(TRITON_INTERPRET=1 before import) or a CUDA GPU")

# (atol, rtol) by input dtype, for out and for the fp32 lse alike (tests/utils.py); the GPU's exp2 is approximate
TOL = {**TOLERANCES, **({torch.float32: (1e-4, 1e-4)} if DEV == "cuda" else {})}
HOPPER_GPU = CUDA and torch.cuda.get_device_capability()[0] >= 9
# the Hopper kernel's switch settings the fuzz draws from: the default, pointer loads, and every block masked with
# a rescale at every step (the portable kernel's numerics)
HOPPER_VARIANTS = [HopperOptions(), HopperOptions(tma=False),
                   HopperOptions(split_full=False, rescale_threshold=0.0, tma=False)]


@pytest.fixture(scope="module", params=["portable", "hopper"])
def kernel(request):
    """Which forward kernel a test runs; the Hopper kernel compiled only on sm90+ GPUs."""
    if request.param == "hopper" and DEV == "cuda" and not HOPPER_GPU:
        pytest.skip("the Hopper kernel needs compute capability >= 9.0")
    return request.param


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def random_plan(gen: torch.Generator, batch: int, heads: int, seq_q: int, seq_k: int, block_q: int, block_k: int,
                *, density: float = 0.5, empty_row: bool = True, kv_block_valid: torch.Tensor | None = None,
                device: str | torch.device = DEV) -> SparsePlan:
    """A random plan; with ``empty_row`` the first query block of (0, 0) reads nothing and the last of
    (-1, -1) reads everything."""
    mq, mk = _cdiv(seq_q, block_q), _cdiv(seq_k, block_k)
    mask = torch.rand(batch, heads, mq, mk, generator=gen) < density
    if empty_row:
        mask[0, 0, 0] = False
        mask[-1, -1, -1] = True
    return SparsePlan.from_dense(mask.to(device), block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
                                 kv_block_valid=kv_block_valid)


def random_valid(gen: torch.Generator, seq_k: int, block_k: int, device=DEV) -> torch.Tensor:
    """Per-key-block real-token counts in [0, block_k], some full, one zero (a block of pure padding)."""
    mk = _cdiv(seq_k, block_k)
    valid = torch.randint(0, block_k + 1, (mk,), generator=gen, dtype=torch.int32)
    valid[::3] = block_k
    if mk > 1:
        valid[1] = 0
    return valid.to(device)


def run_kernel(q, k, v, plan: SparsePlan, scale: float, *, expand: bool = True, kernel: str = "portable",
               options: HopperOptions | None = None):
    """Launch a kernel with the plan's tables (expanded to ``[B, H, ...]`` views unless ``expand=False``): the
    portable one on the CSR, the Hopper one (with ``options``) on ``plan.full_split``."""
    bsz, heads = q.shape[0], q.shape[2]
    tables = (plan.kv_num_blocks, plan.kv_indices) if kernel == "portable" else plan.full_split
    out_scale, out_bias = plan.out_scale, plan.out_bias
    if expand:
        tables = tuple(t.expand(bsz, heads, *t.shape[2:]) for t in tables)
        if out_scale is not None:
            out_scale = out_scale.expand(bsz, heads, out_scale.shape[-1])
        if out_bias is not None:
            out_bias = out_bias.expand(bsz, out_bias.shape[1], heads, out_bias.shape[-1])
    kw = dict(block_q=plan.block_q, block_k=plan.block_k, kv_block_valid=plan.kv_block_valid, scale=scale,
              out_scale=out_scale, out_bias=out_bias, scale_per_block=plan.scale_per_block,
              bias_per_block=plan.bias_per_block)
    if kernel == "portable":
        return block_sparse_attn_fwd(q, k, v, *tables, **kw)
    return block_sparse_attn_hopper_fwd(q, k, v, *tables, **kw, options=options or HopperOptions())


def check(q, k, v, plan: SparsePlan, *, scale: float | None = None, expand: bool = True, tol=None,
          kernel: str = "portable", options: HopperOptions | None = None):
    """Kernel vs reference: out within the dtype tolerance, lse equal in -inf pattern and close elsewhere,
    no NaN, and rows that read no real key exactly equal to the reference (``out_bias`` or 0)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = run_kernel(q, k, v, plan, scale, expand=expand, kernel=kernel, options=options)
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, plan, scale=scale, return_lse=True)

    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    atol, rtol = tol or TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)

    empty = torch.isneginf(ref_lse)  # [B, H, Sq]: rows that read no real key
    assert torch.equal(torch.isneginf(lse), empty), "lse = -inf on a different set of rows than the reference"
    latol, lrtol = tol or TOL[q.dtype]
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=latol, rtol=lrtol)
    rows = empty.transpose(1, 2)  # [B, Sq, H]
    assert torch.equal(out[rows], ref_out[rows]), "rows without keys must equal out_bias (or 0) exactly"
    return out, lse, empty


def qkv(gen, bsz, seq_q, seq_k, heads, dim, dtype=torch.float32, device=DEV):
    def r(s):
        return torch.randn(bsz, s, heads, dim, generator=gen).to(device=device, dtype=dtype)
    return r(seq_q), r(seq_k), r(seq_k)


def epilogue(gen, plan: SparsePlan, bsz: int, heads: int, dim: int, scale_kind: str | None, bias_kind: str | None,
             *, bias_dtype=torch.float32, bcast: bool = False) -> SparsePlan:
    """Attach out_scale / out_bias of the given kind ("row" or "block"); ``bcast`` gives them batch 1."""
    b = 1 if bcast else bsz
    s = bi = None
    if scale_kind is not None:
        n = plan.seq_q if scale_kind == "row" else plan.num_q_blocks
        s = (torch.rand(b, heads, n, generator=gen) * 2 - 0.5).to(plan.device)
    if bias_kind is not None:
        n = plan.seq_q if bias_kind == "row" else plan.num_q_blocks
        bi = torch.randn(b, n, heads, dim, generator=gen).to(device=plan.device, dtype=bias_dtype)
    return plan.with_epilogue(s, bi)


# ----------------------------------------------------------------------------------------------------------------
# CPU (interpreter) cases
# ----------------------------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("dim", [16, 24, 64], ids=lambda d: f"D{d}")
def test_awkward_lengths_random_plan(dim, kernel):
    gen = torch.Generator().manual_seed(dim)
    bsz, heads, seq_q, seq_k = 2, 2, 113, 203
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, 64, 64, density=0.5)
    assert bool((plan.kv_num_blocks == 0).any())
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, kernel=kernel)


@needs_kernel
@pytest.mark.parametrize("block_q,block_k", [(64, 128), (128, 64), (48, 80), (32, 96)],
                         ids=lambda b: str(b))
def test_block_sizes(block_q, block_k, kernel):
    """Different q/k blocks and non-power-of-two blocks (several kernel tiles per plan block)."""
    gen = torch.Generator().manual_seed(block_q * 1000 + block_k)
    bsz, heads, seq_q, seq_k, dim = 1, 2, 150, 230, 32
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, block_q, block_k, density=0.6)
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, kernel=kernel)


@needs_kernel
def test_dense_plan_matches_sdpa(kernel):
    gen = torch.Generator().manual_seed(1)
    bsz, heads, seq, dim = 1, 2, 200, 40
    q, k, v = qkv(gen, bsz, seq, seq, heads, dim)
    plan = SparsePlan.dense(seq_q=seq, seq_k=seq, block_q=64, block_k=64, device=DEV)
    out, lse = run_kernel(q, k, v, plan, 0.3, kernel=kernel)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2), scale=0.3).transpose(1, 2)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(out, sdpa, atol=atol, rtol=rtol)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=atol, rtol=rtol)


@needs_kernel
def test_key_block_padding(kernel):
    """kv_block_valid masks padding slots (including a block of pure padding) on top of the ragged tail."""
    gen = torch.Generator().manual_seed(2)
    bsz, heads, seq_q, seq_k, dim = 1, 2, 128, 300, 32
    valid = torch.tensor([64, 0, 17, 64, 44], dtype=torch.int32)
    mask = torch.rand(bsz, heads, 2, 5, generator=gen) < 0.6
    mask[0, 0, 0] = False
    mask[0, 0, 1] = False
    mask[0, 0, 1, 1] = True  # reads only the pure-padding block -> no real key
    mask[0, 1, 1] = True
    plan = SparsePlan.from_dense(mask.to(DEV), block_q=64, block_k=64, seq_q=seq_q, seq_k=seq_k,
                                 kv_block_valid=valid.to(DEV))
    q, k, v = qkv(gen, bsz, seq_q, seq_k, heads, dim)
    _, lse, empty = check(q, k, v, plan, kernel=kernel)
    assert bool(empty[0, 0].all()) and not bool(empty[0, 1].any())

    # padding must not leak: garbage (even NaN) in padding slots leaves out unchanged
    pad = ((torch.arange(seq_k) % 64) >= valid.long()[torch.arange(seq_k) // 64]).to(DEV)
    k2, v2 = k.clone(), v.clone()
    k2[:, pad], v2[:, pad] = float("nan"), float("nan")
    out_a, _ = run_kernel(q, k, v, plan, 0.2, kernel=kernel)
    out_b, _ = run_kernel(q, k2, v2, plan, 0.2, kernel=kernel)
    assert torch.equal(out_a, out_b)


@needs_kernel
@pytest.mark.parametrize("scale_kind,bias_kind", [("row", None), (None, "row"), ("row", "row"),
                                                  ("block", "block"), ("row", "block"), ("block", "row")],
                         ids=lambda k: str(k))
def test_epilogue(scale_kind, bias_kind, kernel):
    gen = torch.Generator().manual_seed(3)
    bsz, heads, seq_q, seq_k, dim = 2, 2, 113, 150, 24
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, 64, 64, density=0.5)
    plan = epilogue(gen, plan, bsz, heads, dim, scale_kind, bias_kind)
    out, _, empty = check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, kernel=kernel)
    if bias_kind is not None:
        assert bool(empty.any())
        bias = plan.out_bias
        if plan.bias_per_block:
            bias = bias.repeat_interleave(64, dim=1)[:, :seq_q]
        rows = empty.transpose(1, 2)
        assert torch.equal(out[rows], bias[rows]), "an empty row must return out_bias exactly"


@needs_kernel
@pytest.mark.parametrize("bias_dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_epilogue_bias_dtype_differs(bias_dtype, kernel):
    """out_bias in another dtype than fp32 q (the epilogue computes in fp32 and casts once)."""
    gen = torch.Generator().manual_seed(4)
    bsz, heads, seq, dim = 1, 2, 100, 16
    plan = random_plan(gen, bsz, heads, seq, seq, 64, 64)
    plan = epilogue(gen, plan, bsz, heads, dim, "block", "row", bias_dtype=bias_dtype)
    check(*qkv(gen, bsz, seq, seq, heads, dim), plan, kernel=kernel)


@needs_kernel
@pytest.mark.parametrize("plan_b,plan_h", [(1, 1), (1, 3), (2, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "size1"])
def test_broadcast_plan(plan_b, plan_h, expand, kernel):
    """Plans and epilogues with batch or head 1: as stride-0 expanded views, or passed with their size-1 dims."""
    gen = torch.Generator().manual_seed(plan_b * 10 + plan_h)
    bsz, heads, seq_q, seq_k, dim = 2, 3, 96, 160, 16
    plan = random_plan(gen, plan_b, plan_h, seq_q, seq_k, 64, 64, density=0.5)
    plan = epilogue(gen, plan, bsz, heads, dim, "row", "block", bcast=True)
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, expand=expand, kernel=kernel)


@needs_kernel
def test_non_contiguous_fused_qkv(kernel):
    """q, k, v as slices of a fused [B, S, 3, H, D] tensor, and a [B, H, S, D] tensor seen as [B, S, H, D]."""
    gen = torch.Generator().manual_seed(5)
    bsz, heads, seq, dim = 2, 2, 140, 24
    fused = torch.randn(bsz, seq, 3, heads, dim, generator=gen).to(DEV)
    q, k, v = fused.unbind(2)
    assert not q.is_contiguous()
    plan = random_plan(gen, bsz, heads, seq, seq, 64, 64, density=0.6)
    check(q, k, v, plan, kernel=kernel)

    kv_cross = torch.randn(bsz, heads, 2 * seq + 3, dim, generator=gen).to(DEV).transpose(1, 2)  # [B,S,H,D] view
    q2 = torch.randn(bsz, heads, seq, dim, generator=gen).to(DEV).transpose(1, 2)
    plan2 = random_plan(gen, bsz, heads, seq, 2 * seq + 3, 64, 64, density=0.5)
    check(q2, kv_cross, kv_cross.flip(1)[:, :], plan2, kernel=kernel)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype, kernel):
    """fp16 dots in the interpreter, and bf16 through the fp32 upcast (the interpreter's bf16 tl.dot is wrong)."""
    gen = torch.Generator().manual_seed(6)
    bsz, heads, seq_q, seq_k, dim = 1, 2, 113, 203, 64
    valid = random_valid(gen, seq_k, 64)
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, 64, 64, density=0.6, kv_block_valid=valid)
    plan = epilogue(gen, plan, bsz, heads, dim, "row", "block", bias_dtype=dtype)
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim, dtype), plan, kernel=kernel)


@needs_kernel
@pytest.mark.parametrize("dim", [1, 8, 72, 130], ids=lambda d: f"D{d}")
def test_head_dims_padded(dim, kernel):
    gen = torch.Generator().manual_seed(7 + dim)
    bsz, heads, seq_q, seq_k = 1, 1, 70, 90
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, 64, 32, density=0.7)
    plan = epilogue(gen, plan, bsz, heads, dim, None, "row")
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, kernel=kernel)


@needs_kernel
def test_zero_blocks_everywhere(kernel):
    """A plan that reads nothing: out = out_bias exactly, lse = -inf everywhere."""
    gen = torch.Generator().manual_seed(8)
    bsz, heads, seq, dim = 1, 2, 80, 16
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool, device=DEV)
    plan = SparsePlan.from_dense(mask, block_q=64, block_k=64, seq_q=seq, seq_k=seq)
    plan = epilogue(gen, plan, bsz, heads, dim, "row", "row")
    out, lse, _ = check(*qkv(gen, bsz, seq, seq, heads, dim), plan, kernel=kernel)
    assert bool(torch.isneginf(lse).all())
    assert torch.equal(out, plan.out_bias)


@needs_kernel
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(bsz=st.integers(1, 2), heads=st.integers(1, 2), seq_q=st.integers(1, 150), seq_k=st.integers(1, 150),
       dim=st.integers(1, 80), block_q=st.sampled_from([16, 32, 48, 64]), block_k=st.sampled_from([16, 32, 48, 64]),
       density=st.sampled_from([0.5, 0.25, 0.8, 1.0, 0.0]), padded=st.booleans(),
       scale_kind=st.sampled_from([None, "row", "block"]), bias_kind=st.sampled_from([None, "row", "block"]),
       seed=st.integers(0, 2**31 - 1), options=st.sampled_from(HOPPER_VARIANTS))
def test_fuzz(bsz, heads, seq_q, seq_k, dim, block_q, block_k, density, padded, scale_kind, bias_kind, seed, options,
              kernel):
    gen = torch.Generator().manual_seed(seed)
    valid = random_valid(gen, seq_k, block_k) if padded else None
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, block_q, block_k, density=density, empty_row=False,
                       kv_block_valid=valid)
    plan = epilogue(gen, plan, bsz, heads, dim, scale_kind, bias_kind)
    check(*qkv(gen, bsz, seq_q, seq_k, heads, dim), plan, scale=0.5 / math.sqrt(dim), kernel=kernel,
          options=options)  # options: the Hopper kernel's switches (unused by the portable kernel)


@needs_kernel
@pytest.mark.parametrize("pooled", [False, True], ids=["plain", "pooled"])
def test_custom_op_opcheck(pooled, kernel):
    """The backend's custom op (schema inferred from its generated signature, fake, AOT dispatch) passes
    ``torch.library.opcheck``, with padded key blocks, the epilogue and optionally a gated pooled segment."""
    from dit_sparse.backends.base import AttentionInputs
    from dit_sparse.backends.hopper import _hopper_op, _switches
    from dit_sparse.backends.triton import _block_sparse_attn_op, kernel_operands
    from dit_sparse.segment import PooledSegment

    gen = torch.Generator().manual_seed(21)
    bsz, heads, seq, dim = 2, 2, 48, 16
    plan = random_plan(gen, bsz, heads, seq, seq, 16, 16, kv_block_valid=random_valid(gen, seq, 16))
    plan = epilogue(gen, plan, bsz, heads, dim, "row", "block")
    seg = None
    if pooled:
        seg = PooledSegment(keys=torch.randn(1, heads, 5, dim, generator=gen).to(DEV),
                            values=torch.randn(1, heads, 5, dim, generator=gen).to(DEV),
                            log_count=(torch.rand(5, generator=gen) * 3).to(DEV),
                            read=(torch.rand(bsz, heads, plan.num_q_blocks, 5, generator=gen) < 0.6).to(DEV),
                            gate=(0.5 * torch.randn(1, heads, 5, dim, generator=gen)).to(DEV))
    q, k, v = qkv(gen, bsz, seq, seq, heads, dim)
    operands = kernel_operands(AttentionInputs(q, k, v, plan, 0.25, True, seg), bsz, heads)
    if kernel == "portable":
        torch.library.opcheck(_block_sparse_attn_op, (q, k, v, *plan.expand(bsz, heads)), operands)
    else:
        tables = tuple(t.expand(bsz, heads, *t.shape[2:]) for t in plan.full_split)
        torch.library.opcheck(_hopper_op, (q, k, v, *tables), {**operands, **_switches(HopperOptions())})


def test_autotune_prune_keeps_dividing_tiles():
    """The CUDA autotune space, pruned for the plan blocks: tiles divide the blocks and fit shared memory."""
    from dit_sparse.kernels import block_sparse_attn as mod

    for block_q, block_k, block_d, dtype in [(128, 128, 128, torch.bfloat16), (64, 128, 64, torch.float16),
                                             (48, 80, 128, torch.bfloat16), (128, 128, 256, torch.float32),
                                             (16, 16, 16, torch.float32), (192, 320, 128, torch.bfloat16)]:
        args = {"PLAN_BLOCK_Q": block_q, "PLAN_BLOCK_K": block_k, "BLOCK_D": block_d,
                "Q": torch.empty(0, dtype=dtype)}
        kept = mod._prune_configs(mod._AUTOTUNE_CONFIGS, args)
        assert kept, (block_q, block_k, block_d)
        for c in kept:
            assert block_q % c.kwargs["BLOCK_M"] == 0 and block_k % c.kwargs["BLOCK_N"] == 0
            assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16
        if block_q % 64 == 0 and block_k % 64 == 0 and block_d <= 128 and dtype != torch.float32:
            assert len(kept) >= 4
            assert all(c.kwargs["BLOCK_M"] >= 64 and c.kwargs["BLOCK_N"] >= 64 for c in kept)


@pytest.mark.parametrize("kernel_module", ["block_sparse_attn", "block_sparse_attn_hopper"])
def test_autotune_prune_fits_h100_shared_memory(kernel_module, monkeypatch):
    """Every config either kernel's prune keeps fits the H100's 227 KiB of shared memory by the need computed from
    its tiles, stages, dtype and head dim; the Hopper kernel's fp32 / head-dim-256 space (whose preferred 128-row
    tiles need 384 KiB and more) falls back to smaller tiles that fit instead of keeping one that cannot launch.
    ``DIT_SPARSE_AUTOTUNE=quick`` keeps one config; a budget nothing fits raises with the need."""
    import importlib

    from dit_sparse.kernels.block_sparse_attn import H100_SMEM_BYTES, config_smem_bytes

    mod = importlib.import_module(f"dit_sparse.kernels.{kernel_module}")
    # by hand: bf16, D 128, 128 x 64 tiles, 3 stages: q 32 KiB + p 16 KiB + k and v 3 x 16 KiB each
    assert config_smem_bytes(128, 64, 3, block_d=128, elsize=2) == (32 + 16 + 96) * 1024
    # the pooled loop's fp32 tiles (keys, values, gate keys) outgrow the bf16 key loop
    assert config_smem_bytes(128, 64, 3, block_d=128, elsize=2, has_pooled=True, has_gate=True) == (
        32 + 16 + 3 * 3 * 32) * 1024
    assert H100_SMEM_BYTES == 232448

    def need(c, args):
        return config_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, block_d=args["BLOCK_D"],
                                 elsize=args["Q"].element_size(), has_pooled=args.get("HAS_POOLED", False),
                                 has_gate=args.get("HAS_GATE", False))

    cases = [(128, 128, 256, torch.float32, False), (128, 128, 128, torch.float32, False),
             (128, 128, 128, torch.bfloat16, True), (128, 128, 256, torch.bfloat16, True),
             (64, 128, 64, torch.float16, False), (48, 80, 256, torch.float32, True)]
    for block_q, block_k, block_d, dtype, pooled in cases:
        args = {"PLAN_BLOCK_Q": block_q, "PLAN_BLOCK_K": block_k, "BLOCK_D": block_d, "Q": torch.empty(0, dtype=dtype),
                "HAS_POOLED": pooled, "HAS_GATE": pooled}
        kept = mod._prune_configs(mod._AUTOTUNE_CONFIGS, args)
        case = (block_q, block_k, block_d, dtype, pooled)
        assert kept, case
        for c in kept:
            assert need(c, args) <= H100_SMEM_BYTES, (case, c)
            assert block_q % c.kwargs["BLOCK_M"] == 0 and block_k % c.kwargs["BLOCK_N"] == 0, (case, c)
        monkeypatch.setenv("DIT_SPARSE_AUTOTUNE", "quick")
        quick = mod._prune_configs(mod._AUTOTUNE_CONFIGS, args)
        monkeypatch.delenv("DIT_SPARSE_AUTOTUNE")
        assert len(quick) == 1 and quick[0] in kept, case
    # the case the review found: no preferred tile of the Hopper space fits fp32 at head dim 256
    if kernel_module == "block_sparse_attn_hopper":
        big = [c for c in mod._AUTOTUNE_CONFIGS if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] in (64, 128)]
        args = {"PLAN_BLOCK_Q": 128, "PLAN_BLOCK_K": 128, "BLOCK_D": 256, "Q": torch.empty(0, dtype=torch.float32)}
        assert min(need(c, args) for c in big) > H100_SMEM_BYTES
    args = {"PLAN_BLOCK_Q": 128, "PLAN_BLOCK_K": 128, "BLOCK_D": 256, "Q": torch.empty(0, dtype=torch.float32)}
    with pytest.raises(ValueError, match="fits shared memory.*need at least"):
        mod._prune_tiles(mod._AUTOTUNE_CONFIGS, args, budget=1024)
    monkeypatch.setenv("DIT_SPARSE_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="DIT_SPARSE_AUTOTUNE must be one of"):
        mod._prune_configs(mod._AUTOTUNE_CONFIGS, args)


# ----------------------------------------------------------------------------------------------------------------
# GPU cases
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernel)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_real_shape(dtype, kernel):
    """B=1, H=2, S=32768, D=128, block 128, density ~0.1, padded key blocks and an epilogue."""
    gen = torch.Generator().manual_seed(10)
    bsz, heads, seq, dim, block = 1, 2, 32768, 128, 128
    valid = random_valid(gen, seq, block, device="cuda")
    plan = random_plan(gen, bsz, heads, seq, seq, block, block, density=0.1, kv_block_valid=valid, device="cuda")
    plan = epilogue(gen, plan, bsz, heads, dim, "row", "block", bias_dtype=dtype)
    q, k, v = qkv(gen, bsz, seq, seq, heads, dim, dtype, device="cuda")
    q = (q.float() * 2).to(dtype)  # peakier softmax: outputs of order 0.1-1, so tolerances mean something
    out, _, _ = check(q, k, v, plan, kernel=kernel)
    assert out.is_cuda


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernel)")
@pytest.mark.parametrize("block_q,block_k,dim", [(128, 64, 64), (48, 80, 72), (64, 128, 256), (128, 128, 16)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_configs(block_q, block_k, dim, dtype, kernel):
    """Every autotuned tile family compiles and matches: odd blocks, padded head dims, fp32 without TF32."""
    gen = torch.Generator().manual_seed(block_q + block_k + dim)
    bsz, heads, seq_q, seq_k = 2, 3, 1000, 1203
    valid = random_valid(gen, seq_k, block_k, device="cuda")
    plan = random_plan(gen, bsz, heads, seq_q, seq_k, block_q, block_k, density=0.4, kv_block_valid=valid,
                       device="cuda")
    plan = epilogue(gen, plan, bsz, heads, dim, "block", "row", bias_dtype=dtype)
    tol = (1e-4, 1e-4) if dtype == torch.float32 else None  # exp2 is approximate on the GPU
    q, k, v = qkv(gen, bsz, seq_q, seq_k, heads, dim, dtype, device="cuda")
    check(q, k, v, plan, tol=tol, kernel=kernel)


def _free_cuda_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if CUDA else 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernel)")
@pytest.mark.skipif(_free_cuda_bytes() < 12 * 2**30, reason="needs a CUDA GPU with >= 12 GiB free")
def test_gpu_64bit_offsets(kernel):
    """HunyuanVideo 720p-like fused QKV with CFG batch 2: the view spans > 2^31 elements."""
    bsz, seq, heads, dim, block = 2, 119_808, 24, 128, 128
    fused = torch.empty(bsz, seq, 3, heads, dim, dtype=torch.bfloat16, device="cuda")
    assert fused.numel() > 2**31
    fused.normal_()
    q, k, v = fused.unbind(2)
    mq = _cdiv(seq, block)
    # query block m reads key blocks 0 and m (the diagonal): cheap, and the last rows read the far end
    idx = torch.stack([torch.zeros(mq, dtype=torch.int32), torch.arange(mq, dtype=torch.int32)], -1)
    idx[0, 1] = 1
    num = torch.full((1, 1, mq), 2, dtype=torch.int32)
    plan = SparsePlan(num.cuda(), idx[None, None].cuda(), block, block, seq, seq)
    out, lse = run_kernel(q, k, v, plan, 1.0 / math.sqrt(dim), kernel=kernel)

    b, tail = bsz - 1, 300  # the last rows of the last batch sit past 2^31 elements of the fused view
    rows = torch.arange(seq - tail, seq, device="cuda")
    # only key block 0 and the blocks holding these rows can be read
    keys = torch.cat([torch.arange(block, device="cuda"), torch.arange((seq - tail) // block * block, seq,
                                                                       device="cuda")])
    logits = torch.einsum("qhd,khd->hqk", q[b, rows].float(), k[b, keys].float()) / math.sqrt(dim)
    allowed = (keys[None, :] // block == 0) | (keys[None, :] // block == rows[:, None] // block)
    logits = logits.masked_fill(~allowed[None], float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[b, keys].float())
    torch.testing.assert_close(out[b, rows].float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse[b, :, rows], torch.logsumexp(logits, -1), atol=2e-2, rtol=2e-2)
