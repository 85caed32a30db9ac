"""Block-sparse attention forward built for Hopper (sm90+): a second kernel of the op in
``block_sparse_attn.py`` (same inputs, same ``(out, lse)``, same pooled-segment contract), FA3-class in design.

NOT YET MEASURED ON A GPU: written and tested in the Triton interpreter only (no GPU in the session that wrote
it). Every Hopper feature sits behind a constexpr so the GPU suite can measure it on and off:

* ``SPLIT_FULL`` (full vs partial key blocks, as flex's ``BlockMask`` and FlashAttention-4): the plan row comes as
  two lists from :meth:`SparsePlan.split_full` (``full``: every slot of the key block is a real key; ``partial``:
  padding slots or the ragged tail). Loop 1 walks the full blocks with no key mask at all (unmasked loads along
  keys, no ``tl.where`` on the logits); loop 2 walks the partial blocks masked, as the portable kernel. Off: both
  loops masked (the lists are still split).
* ``RESCALE_THRESHOLD`` (conditional softmax rescaling, FlashAttention-4): ``acc`` / ``l`` are rescaled only when the
  running max grows by more than this many log2 units (0 = always, FlashAttention-2). Exact either way: see
  ``_softmax_step`` in ``block_sparse_attn.py``.
* ``USE_TMA`` (tensor descriptors): q, k, v loads of the full loop and the out store go through device-side
  ``tl.make_tensor_descriptor`` (one 2-D ``[S, D]`` descriptor per (batch, head) slice, TMA on sm90+), whose
  out-of-bounds rows and head-dim columns read as zero and are not written. The launcher turns it on only where
  every operand qualifies (unit stride on D, 16-byte aligned base and strides) and Triton has descriptors; else
  the same kernel runs pointer loads. Partial blocks always use masked pointer loads (padding slots may hold
  anything, even NaN, and must read as zero).
* ``WARP_SPEC`` (``tl.range(..., warp_specialize=True)``, Triton >= 3.4): producer/consumer warp specialisation of
  the key loops by the compiler. Off by default (untested on hardware); ignored by the interpreter.

Kept from the portable kernel: int64 batch/head/sequence offsets, the natural-log LSE, the epilogue
(``out_scale`` / ``out_bias`` per row or per query block), ``kv_block_valid`` masking, empty rows (``out = out_bias``,
``lse = -inf``) and the pooled key segment with its exact contract (the shared ``_pooled_segment`` helper: same
online softmax, per-row read mask, optional gate). Malformed plans: the launcher takes ``split_full``'s lists,
which the one read rule of ``dit_sparse.plan`` already normalised (sorted, unique, in range); the kernel still
clamps counts to ``[0, W]`` and indices to ``[0, Mk)`` (unmasked full-block reads: to the blocks that end inside the
keys), so hand-fed lists never read out of bounds (they may read wrong blocks, and padding slots as keys).

Layout legend: as ``block_sparse_attn.py``; ``full_num`` / ``partial_num`` ``[B, H, Mq]``, ``full_idx`` /
``partial_idx`` ``[B, H, Mq, W]`` (int32, any strides, stride-0 broadcast views allowed).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .block_sparse_attn import (
    _NEG_INIT,
    _epilogue,
    _is_interpreted,
    _kernel_args,
    _largest_pow2_divisor,
    _load_rows,
    _mm,
    _pooled_segment,
    _prune_tiles,
    _softmax_step,
    _store_rows,
)

__all__ = ["MAX_RESCALE_THRESHOLD", "HopperOptions", "block_sparse_attn_hopper_fwd", "has_tensor_descriptors",
           "has_warp_specialize", "kernel_path", "tma_reasons"]


#: the largest conditional-rescaling threshold (log2 units): with a stale running max a probability reaches
#: ``2**threshold``, and ``p`` is rounded to the input dtype for ``p @ v`` (the exact keys and the pooled segment
#: alike); fp16's largest finite value is 65504 < 2**16, so 16 overflows to inf on a jump of exactly 16
MAX_RESCALE_THRESHOLD = 15.0


@dataclass(frozen=True)
class HopperOptions:
    """Switches of the Hopper kernel (each a constexpr; the GPU suite measures them on and off).

    Args:
        split_full (`bool`, defaults to True): unmasked loop over full key blocks, masked loop over partial ones.
        rescale_threshold (`float`, defaults to 8.0): conditional rescaling threshold in log2 units (0 = always
            rescale), at most :data:`MAX_RESCALE_THRESHOLD` (15): a stale max lets a probability reach
            ``2**threshold`` and ``p`` is rounded to the input dtype for ``p @ v``, where fp16's largest finite
            value is 65504 < 2**16.
        tma (`bool` or None, defaults to None): tensor-descriptor loads; None = wherever the inputs qualify.
            True on inputs that do not qualify raises (the reasons listed).
        warp_specialize (`bool`, defaults to False): compiler warp specialisation of the key loops (sm90+,
            Triton >= 3.4).
    """

    split_full: bool = True
    rescale_threshold: float = 8.0
    tma: bool | None = None
    warp_specialize: bool = False

    def __post_init__(self) -> None:
        t = self.rescale_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= MAX_RESCALE_THRESHOLD:
            raise ValueError(f"HopperOptions.rescale_threshold must be a number in [0, {MAX_RESCALE_THRESHOLD:g}] "
                             f"(log2 units; 0 = always rescale; above {MAX_RESCALE_THRESHOLD:g} a probability "
                             f"p <= 2**threshold overflows fp16's 65504 when rounded for p @ v), got {t!r}.")
        for name in ("split_full", "warp_specialize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HopperOptions.{name} must be a bool, got {getattr(self, name)!r}.")
        if self.tma not in (None, True, False):
            raise ValueError(f"HopperOptions.tma must be None (auto), True or False, got {self.tma!r}.")


@functools.cache
def has_tensor_descriptors() -> bool:
    """True when this Triton has device-side tensor descriptors (``tl.make_tensor_descriptor``)."""
    return hasattr(tl, "make_tensor_descriptor")


@functools.cache
def has_warp_specialize() -> bool:
    """True when ``tl.range`` takes ``warp_specialize`` (Triton >= 3.4)."""
    import inspect

    try:
        return "warp_specialize" in inspect.signature(tl.range.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - unusual builds
        return False


def _operand_reasons(name: str, shape, strides, elsize: int, ptr: int) -> list[str]:
    if strides[-1] != 1:
        return [f"{name}: head dim not contiguous (stride {strides[-1]})"]
    reasons = [f"{name}: data pointer not 16-byte aligned"] if ptr % 16 else []
    # the sequence stride is the descriptor's row stride (always checked); batch and head strides move the slice
    # base, which matters only when that dim has more than one entry
    bad = [dim for dim, n, st in zip("bsh", shape[:3], strides[:3])
           if (n > 1 or dim == "s") and (st * elsize) % 16]
    if bad:
        reasons.append(f"{name}: strides of dims {','.join(bad)} ({tuple(strides[:3])}, {elsize}-byte elements) "
                       "not multiples of 16 bytes")
    return reasons


def tma_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """Why tensor descriptors cannot serve these ``[B, S, H, D]`` operands and the (contiguous) output (empty =
    they can). A descriptor covers one (batch, head) slice as a 2-D ``[S, D]`` tensor: the slice base and the
    sequence stride must be 16-byte aligned and D contiguous (TMA's rules)."""
    if not has_tensor_descriptors():
        return [f"triton {triton.__version__} has no tl.make_tensor_descriptor (pointer loads run instead)"]
    reasons = []
    for name, t in zip("qkv", (q, k, v)):
        reasons += _operand_reasons(name, t.shape, t.stride(), t.element_size(), t.data_ptr())
    b, s, h, d = q.shape  # out: a fresh contiguous [B, Sq, H, D] tensor (the allocator aligns its pointer)
    reasons += _operand_reasons("out", (b, s, h, d), (s * h * d, h * d, d, 1), q.element_size(), 0)
    return reasons


# ----------------------------------------------------------------------------------------------------------------
# autotune space (CUDA only; the interpreter runs one fixed config). Hopper: BLOCK_M 128 (a warpgroup MMA per
# 64 rows), BLOCK_N 64/128, 4 or 8 warps, 2-4 stages; smaller tiles stay as fallbacks for plan blocks that 64
# does not divide, and the prune keeps only tiles that divide the plan blocks and fit shared memory.
# ----------------------------------------------------------------------------------------------------------------
_TILES = (16, 32, 64, 128)
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in _TILES for bn in _TILES for w in (4, 8) for s in (2, 3, 4)
]


def _prune_configs(configs, named_args, **kwargs):
    """BLOCK_M 128 where it divides block_q (else 64, else the largest power of two dividing it); BLOCK_N 64 or
    128 dividing block_k (else the largest power of two); shared memory as the portable kernel's prune."""
    return _prune_tiles(configs, {**named_args, **kwargs}, m_sizes=(128, 64), n_sizes=(64, 128), m_first=True)


@triton.jit
def _kv_loop(q, m_i, l_i, acc, idx_ptr, stride_iw, n_blocks, last_block,
             k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, KvValid,
             offs_n, offs_d, d_ok, SEQ_K, qk_scale,
             PLAN_BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
             MASKED: tl.constexpr, HAS_KV_VALID: tl.constexpr, USE_TMA: tl.constexpr, UPCAST: tl.constexpr,
             IEEE_DOT: tl.constexpr, RESCALE_THRESHOLD: tl.constexpr, WARP_SPEC: tl.constexpr):
    """Walk ``n_blocks`` listed key blocks (``idx_ptr``) x sub-tiles, one flattened loop so it pipelines.
    ``MASKED``: keys past the block's real count are masked (loads and logits); else every slot is read as is.
    Indices are clamped to ``[0, last_block]`` (hand-fed lists never read out of bounds)."""
    SUB_TILES: tl.constexpr = PLAN_BLOCK_K // BLOCK_N
    k_tile = offs_n[:, None] * stride_ks + offs_d[None, :]   # int32 offsets inside one sub-tile
    v_tile = offs_n[:, None] * stride_vs + offs_d[None, :]
    for it in tl.range(0, n_blocks * SUB_TILES, warp_specialize=WARP_SPEC):
        blk = it // SUB_TILES
        sub = it % SUB_TILES
        kv_block = tl.minimum(tl.maximum(tl.load(idx_ptr + blk * stride_iw), 0), last_block)
        block_start = kv_block * PLAN_BLOCK_K
        start_n = block_start + sub * BLOCK_N
        if MASKED:
            n_real = tl.minimum(SEQ_K - block_start, PLAN_BLOCK_K)
            if HAS_KV_VALID:
                n_real = tl.minimum(n_real, tl.load(KvValid + kv_block))
            key_ok = offs_n < (n_real - sub * BLOCK_N)
            if EVEN_D:
                kv_mask = key_ok[:, None]
            else:
                kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + start_n.to(tl.int64) * stride_ks + k_tile, mask=kv_mask, other=0.0)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vs + v_tile, mask=kv_mask, other=0.0)
        elif USE_TMA:
            k = k_desc.load([start_n, 0])
            v = v_desc.load([start_n, 0])
        elif EVEN_D:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_ks + k_tile)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vs + v_tile)
        else:
            k = tl.load(k_base + start_n.to(tl.int64) * stride_ks + k_tile, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + start_n.to(tl.int64) * stride_vs + v_tile, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _mm(q, tl.trans(k), None, IEEE_DOT) * qk_scale   # base-2 logits
        if MASKED:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, IEEE_DOT, RESCALE_THRESHOLD)
    return m_i, l_i, acc


@triton.jit
def _block_sparse_attn_fwd_hopper(
    Q, K, V, Out, Lse,
    FullNum, FullIdx, PartNum, PartIdx, KvValid, OutScale, OutBias,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_fnb, stride_fnh, stride_fnm,
    stride_fib, stride_fih, stride_fim, stride_fiw,
    stride_pnb, stride_pnh, stride_pnm,
    stride_pib, stride_pih, stride_pim, stride_piw,
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
    SPLIT_FULL: tl.constexpr, RESCALE_THRESHOLD: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tl.static_assert(PLAN_BLOCK_Q % BLOCK_M == 0)
    tl.static_assert(PLAN_BLOCK_K % BLOCK_N == 0)
    tl.static_assert(HEAD_DIM <= BLOCK_D)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    # -- program -> (query tile, batch, head, plan row); every batch/head/sequence offset in int64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    row = start_m // PLAN_BLOCK_Q

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (start_m + offs_m) < SEQ_Q
    d_ok = offs_d < HEAD_DIM

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    # -- one 2-D [S, D] descriptor per (batch, head) slice: rows past S and columns past D read as 0, never written
    if USE_TMA:
        k_desc = tl.make_tensor_descriptor(k_base, [SEQ_K, HEAD_DIM], [stride_ks, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [SEQ_K, HEAD_DIM], [stride_vs, 1], [BLOCK_N, BLOCK_D])
        q = tl.make_tensor_descriptor(q_base, [SEQ_Q, HEAD_DIM], [stride_qs, 1], [BLOCK_M, BLOCK_D]).load(
            [start_m, 0])
    else:
        k_desc = k_base
        v_desc = v_base
        q = _load_rows(q_base + start_m.to(tl.int64) * stride_qs + (offs_m[:, None] * stride_qs + offs_d[None, :]),
                       row_ok, d_ok, EVEN_D)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last_block = tl.cdiv(SEQ_K, PLAN_BLOCK_K) - 1
    row64 = row.to(tl.int64)

    # -- loop 1: full key blocks (no key mask when SPLIT_FULL)
    n_full = tl.minimum(tl.maximum(tl.load(FullNum + off_b * stride_fnb + off_h * stride_fnh + row64 * stride_fnm),
                                   0), KV_WIDTH)
    if SPLIT_FULL:  # unmasked reads: only blocks that end inside the keys, even from hand-fed lists
        last_full = SEQ_K // PLAN_BLOCK_K - 1
        n_full = tl.where(last_full < 0, 0, n_full)
    else:
        last_full = last_block
    m_i, l_i, acc = _kv_loop(q, m_i, l_i, acc,
                             FullIdx + off_b * stride_fib + off_h * stride_fih + row64 * stride_fim, stride_fiw,
                             n_full, last_full, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, KvValid,
                             offs_n, offs_d, d_ok, SEQ_K, qk_scale,
                             PLAN_BLOCK_K, BLOCK_N, EVEN_D, not SPLIT_FULL, HAS_KV_VALID, USE_TMA, UPCAST, IEEE_DOT,
                             RESCALE_THRESHOLD, WARP_SPEC)
    # -- loop 2: partial key blocks (padding slots, the ragged tail), masked
    n_part = tl.minimum(tl.maximum(tl.load(PartNum + off_b * stride_pnb + off_h * stride_pnh + row64 * stride_pnm),
                                   0), KV_WIDTH)
    m_i, l_i, acc = _kv_loop(q, m_i, l_i, acc,
                             PartIdx + off_b * stride_pib + off_h * stride_pih + row64 * stride_pim, stride_piw,
                             n_part, last_block, k_base, v_base, k_desc, v_desc, stride_ks, stride_vs, KvValid,
                             offs_n, offs_d, d_ok, SEQ_K, qk_scale,
                             PLAN_BLOCK_K, BLOCK_N, EVEN_D, True, HAS_KV_VALID, USE_TMA, UPCAST, IEEE_DOT,
                             RESCALE_THRESHOLD, WARP_SPEC)

    # -- the pooled key segment (docs/rectification.md#row-combine): same online softmax, per-row read mask,
    # optional gate
    if HAS_POOLED:
        m_i, l_i, acc = _pooled_segment(q, m_i, l_i, acc, off_b, off_h, row, offs_n, offs_d, d_ok, qk_scale,
                                        PK, PV, PBias, PRead, PGate,
                                        stride_pkb, stride_pkh, stride_pkn,
                                        stride_pvb, stride_pvh, stride_pvn,
                                        stride_rb, stride_rh, stride_rm, stride_rn,
                                        stride_gb, stride_gh, stride_gn,
                                        NUM_POOLED, Q.dtype.element_ty, EVEN_D, IEEE_DOT, HAS_GATE,
                                        RESCALE_THRESHOLD, BLOCK_N)

    o = _epilogue(acc, l_i, m_i, off_b, off_h, row, start_m, offs_m, offs_d, row_ok, d_ok,
                  Lse, OutScale, OutBias,
                  stride_sb, stride_sh, stride_ss,
                  stride_bb, stride_bs, stride_bh, stride_bd,
                  H, SEQ_Q, HAS_SCALE, HAS_BIAS, SCALE_PER_BLOCK, BIAS_PER_BLOCK)
    o = o.to(Out.dtype.element_ty)
    if USE_TMA:
        tl.make_tensor_descriptor(o_base, [SEQ_Q, HEAD_DIM], [stride_os, 1], [BLOCK_M, BLOCK_D]).store([start_m, 0], o)
    else:
        _store_rows(o_base + start_m.to(tl.int64) * stride_os + (offs_m[:, None] * stride_os + offs_d[None, :]),
                    o, row_ok, d_ok, EVEN_D)


@functools.cache
def _autotuned_kernel():
    """The autotuned kernel (built on first CUDA use; the interpreter never sees it)."""
    return triton.autotune(
        configs=_AUTOTUNE_CONFIGS,
        key=["PLAN_BLOCK_Q", "PLAN_BLOCK_K", "HEAD_DIM", "HAS_POOLED", "SPLIT_FULL", "RESCALE_THRESHOLD", "USE_TMA",
             "WARP_SPEC"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_block_sparse_attn_fwd_hopper)


def _torch_alloc(size: int, alignment: int, stream):
    """Triton's scratch allocator for device-side tensor descriptors (the torch caching allocator; works under
    CUDA graph capture)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side descriptors need a Triton allocator on CUDA; install the torch one unless one is set."""
    try:
        from triton.runtime import _allocation
    except ImportError:  # pragma: no cover - layout of triton's private modules changed
        triton.set_allocator(_torch_alloc)
        return
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_alloc)


def block_sparse_attn_hopper_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, full_num: torch.Tensor,
                                 full_idx: torch.Tensor, partial_num: torch.Tensor, partial_idx: torch.Tensor, *,
                                 block_q: int, block_k: int, kv_block_valid: torch.Tensor | None = None,
                                 scale: float, out_scale: torch.Tensor | None = None,
                                 out_bias: torch.Tensor | None = None, scale_per_block: bool = False,
                                 bias_per_block: bool = False, pooled_keys: torch.Tensor | None = None,
                                 pooled_values: torch.Tensor | None = None,
                                 pooled_log_count: torch.Tensor | None = None,
                                 pooled_read: torch.Tensor | None = None, pooled_gate: torch.Tensor | None = None,
                                 options: HopperOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Hopper kernel. Arguments as :func:`~dit_sparse.kernels.block_sparse_attn.block_sparse_attn_fwd`,
    with the plan as :meth:`SparsePlan.split_full`'s four tables (``[B, H, Mq]`` counts, ``[B, H, Mq, W]``
    indices; may be expanded views) and ``options`` (:class:`HopperOptions`). No validation beyond the TMA
    qualification: the caller checks shapes, dtypes and devices.

    Returns ``out`` ``[B, Sq, H, D]`` contiguous in ``q.dtype`` and ``lse`` float32 ``[B, H, Sq]`` (natural log).
    """
    options = HopperOptions() if options is None else options
    bsz, seq_q, heads, dim = q.shape
    out = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, seq_q), dtype=torch.float32, device=q.device)
    if bsz == 0 or seq_q == 0 or heads == 0:
        return out, lse

    interpreted = _is_interpreted(_block_sparse_attn_fwd_hopper)
    args, meta = _kernel_args(q, k, v, out, lse, (full_num, full_idx, partial_num, partial_idx), interpreted,
                              block_q=block_q, block_k=block_k, scale=scale, kv_block_valid=kv_block_valid,
                              out_scale=out_scale, out_bias=out_bias, scale_per_block=scale_per_block,
                              bias_per_block=bias_per_block, pooled_keys=pooled_keys, pooled_values=pooled_values,
                              pooled_log_count=pooled_log_count, pooled_read=pooled_read, pooled_gate=pooled_gate)

    why_not_tma = tma_reasons(q, k, v)
    if options.tma and why_not_tma:
        raise ValueError("HopperOptions(tma=True) but tensor descriptors cannot serve these inputs: "
                         + "; ".join(why_not_tma) + ". Use tma=None to fall back to pointer loads.")
    use_tma = options.tma is not False and not why_not_tma
    if options.warp_specialize and not has_warp_specialize():
        raise ValueError(f"HopperOptions(warp_specialize=True) needs Triton >= 3.4 (tl.range(warp_specialize=)); "
                         f"this is {triton.__version__}.")

    meta.update(SPLIT_FULL=options.split_full, RESCALE_THRESHOLD=float(options.rescale_threshold), USE_TMA=use_tma,
                WARP_SPEC=options.warp_specialize and not interpreted)
    if interpreted:
        block_m = _largest_pow2_divisor(block_q, 128)
        block_n = _largest_pow2_divisor(block_k, 128)
        grid = (triton.cdiv(seq_q, block_m), bsz * heads)
        _block_sparse_attn_fwd_hopper[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
                                            num_stages=1)
    else:
        if use_tma:
            _ensure_allocator()

        def grid(meta_):
            return (triton.cdiv(seq_q, meta_["BLOCK_M"]), bsz * heads)
        _autotuned_kernel()[grid](*args, **meta)
    return out, lse


def kernel_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: HopperOptions | None = None) -> str:
    """One line saying which path the kernel takes for these inputs (the backend logs it)."""
    options = HopperOptions() if options is None else options
    why = tma_reasons(q, k, v)
    if options.tma is False:
        loads = "pointer loads (tma=False)"
    elif why:
        loads = "pointer loads (" + "; ".join(why) + ")"
    else:
        loads = "TMA descriptors for q/k/v/out (full blocks; partial blocks use masked pointer loads)"
    split = "full/partial split" if options.split_full else "all blocks masked"
    rescale = (f"conditional rescale > {options.rescale_threshold:g} log2" if options.rescale_threshold > 0
               else "rescale every step")
    ws = "warp specialisation " + ("on" if options.warp_specialize else "off")
    return f"hopper kernel: {loads}; {split}; {rescale}; {ws}"
