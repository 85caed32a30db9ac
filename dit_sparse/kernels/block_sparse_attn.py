"""Block-sparse FlashAttention forward (FlashAttention-2, Dao 2023, arXiv 2307.08691) over a CSR block plan.

One program owns one ``BLOCK_M`` tile of query rows of one (batch, head). It loads the query tile once, then walks
the key blocks its plan row lists (``kv_indices[b, h, m, :kv_num_blocks[b, h, m]]``, the layout of flex
attention's ``BlockMask``), in ``BLOCK_N`` sub-tiles, with an online softmax in fp32 (``exp2``; logits scaled
by ``scale * log2(e)``). The epilogue applies the plan's correction ``out = out_scale * (acc / l) + out_bias``
and writes the natural-log row LSE.

Layout legend: q ``[B, Sq, H, D]``, k / v ``[B, Sk, H, D]`` (any strides, unit stride on D), kv_num_blocks
``[B, H, Mq]``, kv_indices ``[B, H, Mq, W]``, kv_block_valid ``[Mk]``, out_scale ``[B, H, Sq | Mq]``,
out_bias ``[B, Sq | Mq, H, D]``, out ``[B, Sq, H, D]``, lse ``[B, H, Sq]``; Mq = ceil(Sq / block_q),
Mk = ceil(Sk / block_k).

Malformed plans never read out of bounds (the rule of ``dit_sparse.plan``, shared with the torch backend): the
count is clamped to ``[0, KV_WIDTH]``, and an entry is read only when it lies in ``[0, Mk)`` and exceeds every
entry read before it in its row (duplicates once); any other entry becomes a fully masked sub-tile at block 0.

Masking: key ``n`` is real iff ``n < Sk`` and ``n % block_k < kv_block_valid[n // block_k]``. Masked logits are
-inf; the running max starts at the finite ``-1e30`` so fully masked sub-tiles add nothing and never make NaN.
A row that reads no real key gets ``out = out_bias`` (0 without one) and ``lse = -inf``.

Pooled key segment (``HAS_POOLED``; docs/rectification.md#row-combine, the per-row rectification in one pass).
Contract, which every forward kernel of this op (a later Hopper kernel included) must keep:

* Operands: pooled keys ``PK [B, H, Np, D]`` and values ``PV [B, H, Np, D]`` (float32, unit stride on D; never
  rounded to a 16-bit input dtype: each enters its dots as ``hi + lo``, two tiles of the input dtype, so the
  pooled logits have the exact logits' precision; ``_pooled_segment``), a base-2 bias ``PBias [Np]`` (the
  launcher passes ``log(n_j) * log2(e)``), a read mask ``PRead [B, H, Mq, Np]`` (uint8, per plan query block:
  nonzero = this block's rows may read pooled key j) and, with ``HAS_GATE``, gate keys ``PGate [B, H, Np, D]``.
* After the CSR loop, the program walks the ``Np`` pooled keys in ``BLOCK_N`` chunks, in the SAME online softmax
  (same ``m_i``, ``l_i``, ``acc``): logit ``q . PK[j] * qk_scale + PBias[j]`` where ``PRead[row, j]`` and, with the
  gate, ``|q . PK[j]| > |q . PGate[j]|`` (per query row); ``-inf`` elsewhere. Value ``PV[j]``.
* So ``lse`` and ``out`` are those of one softmax over the plan's real keys and the read pooled keys; the epilogue
  (``out_scale``, ``out_bias``) applies after it, unchanged. Every load is masked (``j < Np`` and the read bit).

Runs compiled on CUDA (autotuned) and in the Triton interpreter (``TRITON_INTERPRET=1`` set before this module
is imported; one fixed config, bf16 tiles upcast to fp32 because the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["block_sparse_attn_fwd"]

# finite initial running max (keeps fully masked sub-tiles NaN-free); read by the kernel as a constexpr
_NEG_INIT = tl.constexpr(-1.0e30)
# softmax runs in base 2: the launcher folds log2(e) into the logit scale, the kernel turns lse back with ln(2)
_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


def _is_interpreted(fn) -> bool:
    """True when ``fn`` was decorated under ``TRITON_INTERPRET=1`` (the decorator decides at import time)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of triton's private modules changed
        return os.environ.get("TRITON_INTERPRET") == "1"
    return isinstance(fn, InterpretedFunction)


def _bcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    """Strides of ``t`` with 0 on every size-1 dim, so un-expanded broadcast operands (B or H of 1) read right."""
    return tuple(0 if n == 1 else st for n, st in zip(t.shape, t.stride()))


def _largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two ``<= cap`` dividing ``n`` (``n`` is a multiple of 16, so the answer is >= 16)."""
    t = 1
    while t * 2 <= cap and n % (t * 2) == 0:
        t *= 2
    return t


# ----------------------------------------------------------------------------------------------------------------
# autotune space (CUDA only; the interpreter cannot benchmark and runs one fixed config)
# ----------------------------------------------------------------------------------------------------------------
_TILE_SIZES = (16, 32, 64, 128)
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in _TILE_SIZES for bn in _TILE_SIZES for w in (4, 8) for s in (2, 3)
]
#: shared memory one program may use on an H100 / H200 (227 KiB, the sm90 opt-in limit per block); a CUDA device
#: with its own limit (``shared_memory_per_block_optin``) is pruned against that instead
H100_SMEM_BYTES = 227 * 1024


def smem_budget(device: torch.device | None) -> int:
    """The shared memory a program may use on ``device`` (its opt-in limit per block; H100's off CUDA)."""
    if device is not None and device.type == "cuda":
        limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
        if limit:
            return int(limit)
    return H100_SMEM_BYTES


def config_smem_bytes(block_m: int, block_n: int, num_stages: int, *, block_d: int, elsize: int,
                      has_pooled: bool = False, has_gate: bool = False) -> int:
    """Shared memory one program of either kernel needs under a tile config (an upper estimate, bytes).

    The q tile (``block_m x block_d``, input dtype), the key loop's pipelined k and v tiles (``num_stages`` buffers
    each of ``block_n x block_d``), and the ``p`` tile's layout conversion for ``p @ v`` (``block_m x block_n``);
    with the pooled segment, its loop's pipelined fp32 key and value tiles (and gate keys), which are live after
    the key loop, not beside it: the larger loop counts."""
    kv_loop = 2 * num_stages * block_n * block_d * elsize
    pooled_loop = (3 if has_gate else 2) * num_stages * block_n * block_d * 4 if has_pooled else 0
    return block_m * block_d * elsize + block_m * block_n * elsize + max(kv_loop, pooled_loop)


def _prune_tiles(configs, args, *, m_sizes=(64, 128), n_sizes=(64, 128), m_first: bool = False, budget=None):
    """Keep tiles that divide the plan blocks: BLOCK_M in ``m_sizes`` dividing block_q (only the first that divides
    with ``m_first``; else the largest power of two dividing it), the same for BLOCK_N in ``n_sizes`` and block_k;
    no 8 warps on tiles under 64; only configs whose shared memory (:func:`config_smem_bytes`) fits ``budget``
    (default: :func:`smem_budget` of the q tensor's device). When no preferred tile fits (fp32 at head dim 256),
    the largest smaller power-of-two tiles that divide the blocks and fit; none at all raises, with the need.
    ``DIT_SPARSE_AUTOTUNE=quick`` keeps only the first config kept (largest tiles, fewest warps and stages):
    nothing to benchmark, one compile per autotune key (the GPU suite's test stage)."""
    from .._env import autotune_mode

    block_q, block_k = args["PLAN_BLOCK_Q"], args["PLAN_BLOCK_K"]
    block_d = args["BLOCK_D"]
    q = args["Q"]
    elsize = q.element_size()
    budget = smem_budget(q.device) if budget is None else budget

    def smem(c):
        return config_smem_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, block_d=block_d,
                                 elsize=elsize, has_pooled=bool(args.get("HAS_POOLED", False)),
                                 has_gate=bool(args.get("HAS_GATE", False)))

    def sizes(block, pref, first):
        big = [t for t in pref if block % t == 0]
        return (big[:1] if first else big) or [_largest_pow2_divisor(block, 128)]

    def allowed(c, ms, ns):
        small = min(ms) < 64 or min(ns) < 64
        return (c.kwargs["BLOCK_M"] in ms and c.kwargs["BLOCK_N"] in ns and not (small and c.num_warps == 8)
                and smem(c) <= budget)

    ms, ns = sizes(block_q, m_sizes, m_first), sizes(block_k, n_sizes, False)
    keep = [c for c in configs if allowed(c, ms, ns)]
    if not keep:  # the preferred tiles overflow shared memory: the largest smaller tiles that fit
        fit = [c for c in configs if block_q % c.kwargs["BLOCK_M"] == 0 and block_k % c.kwargs["BLOCK_N"] == 0
               and smem(c) <= budget and not (min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) < 64
                                              and c.num_warps == 8)]
        if not fit:
            need = min(smem(c) for c in configs)
            raise ValueError(f"no tile config of this kernel fits shared memory: blocks ({block_q}, {block_k}), "
                             f"head dim {block_d} (padded), {elsize}-byte elements need at least {need} bytes, "
                             f"the device allows {budget}; use bf16/fp16 inputs or a smaller head dim.")
        area = max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in fit)
        keep = [c for c in fit if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == area]
    if autotune_mode() == "quick":
        keep = [min(keep, key=lambda c: (-c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], -c.kwargs["BLOCK_M"],
                                          c.num_warps, c.num_stages))]
    return keep


def _prune_configs(configs, named_args, **kwargs):
    """The portable kernel's prune: BLOCK_M / BLOCK_N in {64, 128} dividing the plan blocks (``_prune_tiles``)."""
    return _prune_tiles(configs, {**named_args, **kwargs})


# ----------------------------------------------------------------------------------------------------------------
# device helpers shared by every forward kernel of this op (this one and ``block_sparse_attn_hopper``)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, acc, IEEE_DOT: tl.constexpr):
    """``a @ b (+ acc)``; IEEE fp32 (no TF32) for fp32 inputs."""
    if IEEE_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _online_softmax(s, m_i, l_i, acc, RESCALE_THRESHOLD: tl.constexpr):
    """The softmax half of one online-softmax step over a sub-tile of base-2 logits ``s`` [BLOCK_M, BLOCK_N]
    (-inf = not read): returns ``(p, m_i, l_i, acc)`` with ``acc`` and ``l_i`` rescaled to the new running max
    and ``p`` the sub-tile's unnormalised probabilities (fp32), ready for ``acc += p @ v``.

    ``RESCALE_THRESHOLD == 0``: the running max follows every increase (FlashAttention-2). ``> 0`` (conditional
    rescaling, FlashAttention-4): ``acc`` and ``l_i`` are rescaled only when some row's max grows by more than the
    threshold (log2 units); otherwise the stale max stays, so ``p <= 2**threshold`` (the Hopper kernel's
    ``MAX_RESCALE_THRESHOLD`` of 15 keeps ``p`` finite when rounded to fp16 for ``p @ v``) and the result is
    exact, since ``acc``, ``l_i`` and the lse all refer to the same ``m_i``. The test is one scalar per tile (a
    max over every row): a scalar ``if`` is uniform over the whole program, so it never diverges inside a
    warp, and a skipped rescale skips the ``[BLOCK_M, BLOCK_D]`` multiply for all warps. FA4 decides per row
    group inside its softmax warps; Triton gives no per-warp control, so a tile-wide test is the closest form.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if RESCALE_THRESHOLD > 0:
        if tl.max(m_new - m_i, 0) > RESCALE_THRESHOLD:
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
    else:
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    p = tl.math.exp2(s - m_i[:, None])
    l_i = l_i + tl.sum(p, 1)
    return p, m_i, l_i, acc


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, IEEE_DOT: tl.constexpr, RESCALE_THRESHOLD: tl.constexpr):
    """One online-softmax step (``_online_softmax``) over base-2 logits ``s`` [BLOCK_M, BLOCK_N] and their values
    ``v`` [BLOCK_N, BLOCK_D]: ``acc += p @ v`` with ``p`` in ``v``'s dtype. Returns the new ``(m_i, l_i, acc)``."""
    p, m_i, l_i, acc = _online_softmax(s, m_i, l_i, acc, RESCALE_THRESHOLD)
    acc = _mm(p.to(v.dtype), v, acc, IEEE_DOT)
    return m_i, l_i, acc


@triton.jit
def _split_fp32(x, IN_DTYPE: tl.constexpr, TILE_DTYPE: tl.constexpr):
    """An fp32 tile as ``hi + lo``, two tiles of the op's 16-bit input dtype ``IN_DTYPE`` (held in ``TILE_DTYPE``,
    the q tile's dtype: ``IN_DTYPE`` itself on a GPU, fp32 where the interpreter upcasts). ``hi`` keeps the top
    8 (bf16) / 11 (fp16) significand bits, ``lo`` the next as many: ``x - hi - lo`` is below 2^-16 (bf16) /
    2^-22 (fp16) of ``|x|``, near fp32 (``x - hi`` is exact in fp32)."""
    hi = x.to(IN_DTYPE, fp_downcast_rounding="rtne")  # the GPU's default; the interpreter would truncate
    lo = (x - hi.to(tl.float32)).to(IN_DTYPE, fp_downcast_rounding="rtne")
    return hi.to(TILE_DTYPE), lo.to(TILE_DTYPE)


@triton.jit
def _dot_fp32_keys(q, x, IN_DTYPE: tl.constexpr, IEEE_DOT: tl.constexpr):
    """``q @ x^T`` for fp32 pooled keys ``x`` [BLOCK_N, BLOCK_D] at the exact logits' precision: products of
    the q tile with the keys as they are (fp32), accumulated in fp32.

    fp32 inputs: one IEEE dot. 16-bit inputs: ``x`` split into ``hi + lo`` (``_split_fp32``) and two tensor-core
    dots with fp32 accumulation, ``q @ hi^T + q @ lo^T``: q is exact in its dtype and each product of two 16-bit
    values is exact in fp32, so the only rounding left is the fp32 accumulation and the split's residual (below
    2^-16 of ``|x|``), where one dot of ``x`` rounded to bf16 moves a logit of 30 by up to 30 * 2^-8 = 0.12.
    The split costs a second MMA per pooled sub-tile; an IEEE fp32 dot instead (the other exact option) runs on
    the CUDA cores, an order of magnitude slower than the tensor cores, and the segment may hold a few thousand
    keys.
    """
    if IEEE_DOT:
        return tl.dot(q, tl.trans(x), input_precision="ieee")
    else:
        hi, lo = _split_fp32(x, IN_DTYPE, q.dtype)
        return tl.dot(q, tl.trans(lo), tl.dot(q, tl.trans(hi)))


@triton.jit
def _pooled_segment(q, m_i, l_i, acc, off_b, off_h, row, offs_n, offs_d, d_ok, qk_scale,
                    PK, PV, PBias, PRead, PGate,
                    stride_pkb, stride_pkh, stride_pkn,
                    stride_pvb, stride_pvh, stride_pvn,
                    stride_rb, stride_rh, stride_rm, stride_rn,
                    stride_gb, stride_gh, stride_gn,
                    NUM_POOLED, IN_DTYPE: tl.constexpr, EVEN_D: tl.constexpr, IEEE_DOT: tl.constexpr,
                    HAS_GATE: tl.constexpr, RESCALE_THRESHOLD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pooled key segment (docs/rectification.md#row-combine; contract in the module docstring): continues the
    caller's online softmax (``m_i``, ``l_i``, ``acc``) over the ``NUM_POOLED`` pooled keys this plan row may read.
    ``IN_DTYPE``: the op's input dtype (``Q``'s element type; the q tile may be upcast in the interpreter).

    Precision: the pooled keys, gate keys and values are fp32 and never rounded to the 16-bit input dtype as a
    whole. Their dots with the q tile run as ``_dot_fp32_keys`` (hi + lo split, fp32 accumulation), like the
    exact logits (exact 16-bit products, fp32 accumulation); ``p @ v̄`` runs as ``p @ v̄_hi + p @ v̄_lo`` with ``p``
    rounded to the input dtype as the exact part rounds it. Rounding ``v̄`` alone to the input dtype adds up to
    2^-8 (bf16) of ``|v̄|`` to rows the pooled keys dominate, as much again as the output's own rounding: measured
    in the interpreter, it took the output error to 1.7-2.5x the exact part's (the oracle test asks <= 2x)."""
    pk_base = PK + off_b * stride_pkb + off_h * stride_pkh
    pv_base = PV + off_b * stride_pvb + off_h * stride_pvh
    pr_base = PRead + off_b * stride_rb + off_h * stride_rh + row.to(tl.int64) * stride_rm
    pg_base = PGate + off_b * stride_gb + off_h * stride_gh
    for start_p in range(0, NUM_POOLED, BLOCK_N):
        offs_p = start_p + offs_n
        p_ok = offs_p < NUM_POOLED
        p_ok = p_ok & (tl.load(pr_base + offs_p * stride_rn, mask=p_ok, other=0) != 0)
        if EVEN_D:
            p_mask = p_ok[:, None]
        else:
            p_mask = p_ok[:, None] & d_ok[None, :]
        pk = tl.load(pk_base + offs_p[:, None] * stride_pkn + offs_d[None, :], mask=p_mask, other=0.0)
        pv = tl.load(pv_base + offs_p[:, None] * stride_pvn + offs_d[None, :], mask=p_mask, other=0.0)
        pqk = _dot_fp32_keys(q, pk, IN_DTYPE, IEEE_DOT)
        p_read = p_ok[None, :]
        if HAS_GATE:  # GAPR per row: |q . k_mean| > |q . k_dev|, both at the same precision
            pg = tl.load(pg_base + offs_p[:, None] * stride_gn + offs_d[None, :], mask=p_mask, other=0.0)
            pqg = _dot_fp32_keys(q, pg, IN_DTYPE, IEEE_DOT)
            p_read = p_read & (tl.abs(pqk) > tl.abs(pqg))
        # base-2 logits: q . k_mean * scale * log2(e) + log2(n_j) (the launcher pre-multiplies the bias)
        p_bias = tl.load(PBias + offs_p, mask=p_ok, other=0.0)
        plog = tl.where(p_read, pqk * qk_scale + p_bias[None, :], float("-inf"))
        p, m_i, l_i, acc = _online_softmax(plog, m_i, l_i, acc, RESCALE_THRESHOLD)
        if IEEE_DOT:
            acc = tl.dot(p, pv, acc, input_precision="ieee")
        else:
            pv_hi, pv_lo = _split_fp32(pv, IN_DTYPE, q.dtype)
            p = p.to(q.dtype)
            acc = tl.dot(p, pv_lo, tl.dot(p, pv_hi, acc))
    return m_i, l_i, acc


@triton.jit
def _epilogue(acc, l_i, m_i, off_b, off_h, row, start_m, offs_m, offs_d, row_ok, d_ok,
              Lse, OutScale, OutBias,
              stride_sb, stride_sh, stride_ss,
              stride_bb, stride_bs, stride_bh, stride_bd,
              H, SEQ_Q,
              HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
              SCALE_PER_BLOCK: tl.constexpr, BIAS_PER_BLOCK: tl.constexpr):
    """``out = out_scale * (acc / l) + out_bias`` (fp32, returned; the caller stores it) and the natural-log lse
    (stored here). Rows that read no real key keep ``acc = 0``: ``out = out_bias`` (or 0), ``lse = -inf``."""
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if HAS_SCALE:
        s_base = OutScale + off_b * stride_sb + off_h * stride_sh
        if SCALE_PER_BLOCK:
            o = o * tl.load(s_base + row.to(tl.int64) * stride_ss).to(tl.float32)
        else:
            s_ptrs = s_base + start_m.to(tl.int64) * stride_ss + offs_m * stride_ss
            o = o * tl.load(s_ptrs, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        b_base = OutBias + off_b * stride_bb + off_h * stride_bh
        if BIAS_PER_BLOCK:
            bias = tl.load(b_base + row.to(tl.int64) * stride_bs + offs_d * stride_bd, mask=d_ok, other=0.0)
            o = o + bias.to(tl.float32)[None, :]
        else:
            b_ptrs = (b_base + start_m.to(tl.int64) * stride_bs
                      + (offs_m[:, None] * stride_bs + offs_d[None, :] * stride_bd))
            bias = tl.load(b_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            o = o + bias.to(tl.float32)
    lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * _LN2, float("-inf"))
    lse_ptrs = Lse + (off_b * H + off_h) * SEQ_Q + start_m + offs_m
    tl.store(lse_ptrs, lse, mask=row_ok)
    return o


@triton.jit
def _load_rows(ptrs, row_ok, d_ok, EVEN_D: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile, rows past the sequence and columns past the head dim read as 0."""
    if EVEN_D:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_rows(ptrs, value, row_ok, d_ok, EVEN_D: tl.constexpr):
    """Store a ``[rows, BLOCK_D]`` tile, skipping rows past the sequence and columns past the head dim."""
    if EVEN_D:
        tl.store(ptrs, value, mask=row_ok[:, None])
    else:
        tl.store(ptrs, value, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out, Lse,
    KvNum, KvIdx, KvValid, OutScale, OutBias,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_nb, stride_nh, stride_nm,
    stride_ib, stride_ih, stride_im, stride_iw,
    stride_sb, stride_sh, stride_ss,
    stride_bb, stride_bs, stride_bh, stride_bd,
    H, SEQ_Q, SEQ_K, KV_WIDTH, qk_scale,
    PK, PV, PBias, PRead, PGate,
    stride_pkb, stride_pkh, stride_pkn,
    stride_pvb, stride_pvh, stride_pvn,
    stride_rb, stride_rh, stride_rm, stride_rn,
    stride_gb, stride_gh, stride_gn,
    NUM_POOLED,
    PLAN_BLOCK_Q: tl.constexpr, PLAN_BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_KV_VALID: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SCALE_PER_BLOCK: tl.constexpr, BIAS_PER_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, IEEE_DOT: tl.constexpr,
    HAS_POOLED: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tl.static_assert(PLAN_BLOCK_Q % BLOCK_M == 0)
    tl.static_assert(PLAN_BLOCK_K % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM <= BLOCK_D)
    SUB_TILES: tl.constexpr = PLAN_BLOCK_K // BLOCK_N
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    # -- program -> (query tile, batch, head, plan row); every batch/head/sequence offset in int64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    row = start_m // PLAN_BLOCK_Q

    offs_m = tl.arange(0, BLOCK_M)          # rows local to the tile
    offs_n = tl.arange(0, BLOCK_N)          # keys local to the sub-tile
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (start_m + offs_m) < SEQ_Q
    d_ok = offs_d < HEAD_DIM

    # -- load the q tile once
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qs
              + (offs_m[:, None] * stride_qs + offs_d[None, :]))
    q = _load_rows(q_ptrs, row_ok, d_ok, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)

    # -- this tile's plan row, and per-(batch, head) bases of k and v
    csr = off_b * stride_nb + off_h * stride_nh + row.to(tl.int64) * stride_nm
    n_blocks = tl.minimum(tl.maximum(tl.load(KvNum + csr), 0), KV_WIDTH)  # malformed counts: stay in the row
    num_k_blocks = tl.cdiv(SEQ_K, PLAN_BLOCK_K)
    prev = tl.zeros([], dtype=tl.int32) - 1  # largest key block read so far in this row
    idx_ptr = KvIdx + off_b * stride_ib + off_h * stride_ih + row.to(tl.int64) * stride_im
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    k_tile = offs_n[:, None] * stride_ks + offs_d[None, :]   # int32 offsets inside one sub-tile
    v_tile = offs_n[:, None] * stride_vs + offs_d[None, :]

    m_i = tl.full([BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- loop over listed key blocks x sub-tiles, flattened into one loop so it pipelines
    for it in range(0, n_blocks * SUB_TILES):
        blk = it // SUB_TILES
        sub = it % SUB_TILES
        kv_block = tl.load(idx_ptr + blk * stride_iw)
        # malformed plans: an out-of-range entry loads nothing (no out-of-bounds read); an entry not above every
        # entry read before it (a duplicate, an unsorted repeat) is masked in the logits only, so the k/v
        # addresses never wait on the previous iteration
        in_range = (kv_block >= 0) & (kv_block < num_k_blocks)
        use = in_range & (kv_block > prev)
        prev = tl.where(use & (sub == SUB_TILES - 1), kv_block, prev)
        kv_block = tl.where(in_range, kv_block, 0)
        block_start = kv_block * PLAN_BLOCK_K
        # real keys of this block are [block_start, block_start + n_real)
        n_real = tl.minimum(SEQ_K - block_start, PLAN_BLOCK_K)
        if HAS_KV_VALID:
            n_real = tl.minimum(n_real, tl.load(KvValid + kv_block))
        n_real = tl.where(in_range, n_real, 0)
        key_ok = offs_n < (n_real - sub * BLOCK_N)
        start_n = (block_start + sub * BLOCK_N).to(tl.int64)

        # -- load k, v (masked keys read as 0)
        k = _load_rows(k_base + start_n * stride_ks + k_tile, key_ok, d_ok, EVEN_D)
        v = _load_rows(v_base + start_n * stride_vs + v_tile, key_ok, d_ok, EVEN_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # -- base-2 logits, unreal keys masked to -inf, then the online softmax update (FlashAttention-2 form)
        s = _mm(q, tl.trans(k), None, IEEE_DOT) * qk_scale
        s = tl.where(key_ok[None, :] & use, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE_DOT, 0.0)

    # -- the pooled key segment (docs/rectification.md#row-combine): same online softmax, per-row read mask,
    # optional gate
    if HAS_POOLED:
        m_i, l_i, acc = _pooled_segment(q, m_i, l_i, acc, off_b, off_h, row, offs_n, offs_d, d_ok, qk_scale,
                                        PK, PV, PBias, PRead, PGate,
                                        stride_pkb, stride_pkh, stride_pkn,
                                        stride_pvb, stride_pvh, stride_pvn,
                                        stride_rb, stride_rh, stride_rm, stride_rn,
                                        stride_gb, stride_gh, stride_gn,
                                        NUM_POOLED, Q.dtype.element_ty, EVEN_D, IEEE_DOT, HAS_GATE, 0.0,
                                        BLOCK_N)

    # -- epilogue (out = out_scale * (acc / l) + out_bias, natural-log lse), then store out
    o = _epilogue(acc, l_i, m_i, off_b, off_h, row, start_m, offs_m, offs_d, row_ok, d_ok,
                  Lse, OutScale, OutBias,
                  stride_sb, stride_sh, stride_ss,
                  stride_bb, stride_bs, stride_bh, stride_bd,
                  H, SEQ_Q, HAS_SCALE, HAS_BIAS, SCALE_PER_BLOCK, BIAS_PER_BLOCK)
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_os
              + (offs_m[:, None] * stride_os + offs_d[None, :]))
    _store_rows(o_ptrs, o.to(Out.dtype.element_ty), row_ok, d_ok, EVEN_D)


@functools.cache
def _autotuned_kernel():
    """The autotuned kernel (built on first CUDA use; the interpreter never sees it)."""
    return triton.autotune(
        configs=_AUTOTUNE_CONFIGS,
        # the autotuner adds every tensor argument's dtype
        key=["PLAN_BLOCK_Q", "PLAN_BLOCK_K", "HEAD_DIM", "HAS_POOLED"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_block_sparse_attn_fwd)


def _kernel_args(q, k, v, out, lse, tables, interpreted, *, block_q, block_k, scale, kv_block_valid, out_scale,
                 out_bias, scale_per_block, bias_per_block, pooled_keys, pooled_values, pooled_log_count,
                 pooled_read, pooled_gate) -> tuple[tuple, dict]:
    """The arguments both kernels take, laid out alike in their signatures: ``(args, meta)``, the positional
    arguments ``Q`` to ``NUM_POOLED`` and the constexprs short of the tile sizes and a kernel's own switches.
    ``tables`` are the kernel's plan tables (``[B, H, Mq]`` counts, ``[B, H, Mq, W]`` indices; ``tables[1]`` holds
    indices): they follow ``Out, Lse``, their strides follow out's. Absent optional operands get a harmless
    stand-in pointer (never read: their constexpr flag is off). ``interpreted``: the kernel runs in the Triton
    interpreter (bf16 tiles are upcast there)."""
    _, seq_q, heads, dim = q.shape
    stand_in = tables[0]
    epilogue = (kv_block_valid if kv_block_valid is not None else stand_in,
                out_scale if out_scale is not None else lse,
                out_bias if out_bias is not None else out)
    epilogue_strides = ((_bcast_strides(out_scale) if out_scale is not None else (0, 0, 0))
                        + (_bcast_strides(out_bias) if out_bias is not None else (0, 0, 0, 0)))
    has_pooled = pooled_keys is not None
    has_gate = has_pooled and pooled_gate is not None
    if has_pooled:
        pk, pv, pg = (None if t is None else (t if t.stride(-1) == 1 else t.contiguous())
                      for t in (pooled_keys, pooled_values, pooled_gate))
        pbias = (pooled_log_count.float() * _LOG2E).contiguous()  # base-2 bias
        pread = pooled_read.view(torch.uint8)
        seg_strides = (*_bcast_strides(pk)[:3], *_bcast_strides(pv)[:3], *_bcast_strides(pread),
                       *(_bcast_strides(pg)[:3] if has_gate else (0, 0, 0)))
        pooled = (pk, pv, pbias, pread, pg if has_gate else pk, *seg_strides, pk.shape[2])
    else:
        pooled = (lse, lse, lse, stand_in, lse, *(0,) * 13, 0)
    args = (
        q, k, v, out, lse,
        *tables, *epilogue,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        *(st for t in tables for st in _bcast_strides(t)),
        *epilogue_strides,
        heads, seq_q, k.shape[1], tables[1].shape[-1], float(scale) * _LOG2E,
        *pooled,
    )
    meta = dict(PLAN_BLOCK_Q=int(block_q), PLAN_BLOCK_K=int(block_k), HEAD_DIM=dim,
                BLOCK_D=triton.next_power_of_2(max(dim, 16)), HAS_KV_VALID=kv_block_valid is not None,
                HAS_SCALE=out_scale is not None, HAS_BIAS=out_bias is not None, HAS_POOLED=has_pooled,
                HAS_GATE=has_gate, SCALE_PER_BLOCK=bool(scale_per_block), BIAS_PER_BLOCK=bool(bias_per_block),
                UPCAST=interpreted and q.dtype == torch.bfloat16,  # interpreter bf16 tl.dot is wrong (triton#11584)
                IEEE_DOT=q.dtype == torch.float32)                  # no TF32 for fp32 inputs
    return args, meta


def block_sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                          kv_indices: torch.Tensor, *, block_q: int, block_k: int,
                          kv_block_valid: torch.Tensor | None = None, scale: float,
                          out_scale: torch.Tensor | None = None, out_bias: torch.Tensor | None = None,
                          scale_per_block: bool = False, bias_per_block: bool = False,
                          pooled_keys: torch.Tensor | None = None, pooled_values: torch.Tensor | None = None,
                          pooled_log_count: torch.Tensor | None = None, pooled_read: torch.Tensor | None = None,
                          pooled_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the block-sparse attention forward. No validation: the caller checks shapes, dtypes and devices.

    Args:
        q (`torch.Tensor`, ``[B, Sq, H, D]``), k, v (`torch.Tensor`, ``[B, Sk, H, D]``): fp16, bf16 or fp32,
            any strides with ``stride(-1) == 1``.
        kv_num_blocks (int32 ``[B, H, Mq]``), kv_indices (int32 ``[B, H, Mq, W]``): the CSR plan; may be
            expanded (stride-0) views.
        block_q, block_k (`int`): plan block sizes, multiples of 16.
        kv_block_valid (int32 ``[Mk]``, *optional*): real tokens at the start of each key block.
        scale (`float`): softmax scale.
        out_scale (float32 ``[B, H, Sq]``, or ``[B, H, Mq]`` with ``scale_per_block``, *optional*),
        out_bias (``[B, Sq, H, D]``, or ``[B, Mq, H, D]`` with ``bias_per_block``, *optional*): epilogue
            ``out = out_scale * attention + out_bias``; may be expanded views.
        pooled_keys, pooled_values (float32 ``[B, H, Np, D]``), pooled_log_count (float32 ``[Np]``),
        pooled_read (bool ``[B, H, Mq, Np]``), pooled_gate (float32 ``[B, H, Np, D]`` or None), *optional*: the
            pooled key segment (all or none of the first four; see the module docstring). May be expanded views.

    Returns:
        ``out`` ``[B, Sq, H, D]`` contiguous in ``q.dtype`` and ``lse`` float32 ``[B, H, Sq]`` (natural log).
    """
    bsz, seq_q, heads, dim = q.shape
    out = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, seq_q), dtype=torch.float32, device=q.device)
    if bsz == 0 or seq_q == 0 or heads == 0:
        return out, lse

    interpreted = _is_interpreted(_block_sparse_attn_fwd)
    args, meta = _kernel_args(q, k, v, out, lse, (kv_num_blocks, kv_indices), interpreted, block_q=block_q,
                              block_k=block_k, scale=scale, kv_block_valid=kv_block_valid, out_scale=out_scale,
                              out_bias=out_bias, scale_per_block=scale_per_block, bias_per_block=bias_per_block,
                              pooled_keys=pooled_keys, pooled_values=pooled_values,
                              pooled_log_count=pooled_log_count, pooled_read=pooled_read, pooled_gate=pooled_gate)

    if interpreted:
        # one fixed config, the largest tiles (the interpreter's cost is per program x sub-tile)
        block_m = _largest_pow2_divisor(block_q, 256)
        block_n = _largest_pow2_divisor(block_k, 256)
        grid = (triton.cdiv(seq_q, block_m), bsz * heads)
        _block_sparse_attn_fwd[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    else:
        def grid(meta_):
            return (triton.cdiv(seq_q, meta_["BLOCK_M"]), bsz * heads)
        _autotuned_kernel()[grid](*args, **meta)
    return out, lse
