"""The ``compiled`` backend: the whole plan through ``torch.compile(flex_attention)``, on any device inductor targets.

Why flex through inductor: it is the one block-sparse attention that ``torch.compile`` generates for CPU
(C++/OpenMP) and GPU alike, it skips the key blocks a ``BlockMask`` leaves out, and it never materialises
``S x S``. Measured on a 2-core CPU (B=1, S=8192, H=4, D=128, 128-token blocks, density 0.1): dense SDPA 0.92 s,
this path 0.19 s with the pooled segment; gathering each query block's keys into batched SDPA calls reached only
2.8x (the copies cost more than flex's per-block overhead). ``benchmarks/attention_cpu.py`` has current numbers.

What it runs, exactly as the torch reference (:mod:`dit_sparse.reference.attention`):

* **The plan's blocks** as a ``BlockMask`` (:meth:`SparsePlan.to_flex` with ``eager_safe=False``): whole key
  blocks as *full* blocks (no mask call), blocks with padding slots or the ragged tail as *partial* blocks masked
  by key validity. Malformed rows are normalised by :func:`~dit_sparse.plan.read_entries`, the one read rule.
* **The pooled segment** (:class:`~dit_sparse.segment.PooledSegment`): its keys and values are appended after the
  (block-padded) keys as extra key blocks; a ``score_mod`` adds ``log_count`` to their logits, and the mask reads
  ``read[i, j]`` (and the row gate, precomputed per row) for them. The segment's logits must be as precise as the
  exact ones, so a 16-bit call with a segment runs in float32.
* **The LSE** from flex's auxiliary output where inductor emits it (CUDA; torch 2.13's CPU flex does not, so CPU
  calls with ``return_lse=True`` are refused and run on the reference); **the epilogue** by
  :func:`~dit_sparse.epilogue.apply_epilogue`.

Compile cost: one compilation per *shape signature* (device, dtype, batch, heads, lengths, head dims, block
sizes, softmax scale, segment and gate present); a new plan, layer, step or CFG branch with the same shapes
reuses it (``dynamic=False``: inductor specialises on the lengths, which is what makes the CPU code fast). The
first call of each signature logs its compile time once (``dit_sparse.backends`` logger, INFO) and records it in
:func:`compile_times`. New sequence lengths compile again, up to
:data:`~dit_sparse.backends.flex.MAX_SIGNATURES` per process. Past
``torch._dynamo``'s recompile limit dynamo would run flex uncompiled, which reads only the mask function and not
the block tables (a wrong answer): this backend refuses such a call with that reason, and a call that hits the
limit anyway raises.

Automatic dispatch: on CPU from :func:`~dit_sparse.backends.break_even.sparse_break_even` keys on (measured by
``benchmarks/break_even.py`` and stored with the package); below it a compile is not worth its cost and the torch
reference runs (the dispatcher says why, once). On CUDA the Triton kernels come first; this backend runs there
when named (not yet timed on a GPU).
"""

from __future__ import annotations

import shutil
import time

import torch

from .._env import has_flex_attention
from .._logging import get_logger
from ..epilogue import apply_epilogue
from .base import AttentionInputs, Backend
from .break_even import sparse_break_even
from .flex import compiled_flex_attention, recompile_limit

__all__ = ["CompiledBackend", "compile_times", "segment_block_mask"]

logger = get_logger("dit_sparse.backends")

#: device types whose inductor backend this path was written for (CPU is the tested one)
_DEVICES = ("cpu", "cuda", "xpu")
_LOW = (torch.float16, torch.bfloat16)

_compile_times: dict[tuple, float] = {}


def compile_times() -> dict[str, float]:
    """``{shape signature: first-call seconds}`` of this process's compilations (for run summaries)."""
    return {_describe(sig): sec for sig, sec in _compile_times.items()}


def _describe(sig: tuple) -> str:
    dev, dtype, b, h, sq, sk, d, dv, bq, bk, scale, seg, gate, lse = sig
    return (f"{dev} {str(dtype).removeprefix('torch.')} B={b} H={h} Sq={sq} Sk={sk} D={d} Dv={dv} blocks=({bq}, {bk}) "
            f"scale={scale:.6g}"
            + (" +segment" if seg else "") + (" +gate" if gate else "") + (" +lse" if lse else ""))


def _recompile_limit() -> int:
    return recompile_limit()


def _has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _compute_dtype(inputs: AttentionInputs) -> torch.dtype:
    dtype = inputs.query.dtype
    return torch.float32 if inputs.pooled is not None and dtype in _LOW else dtype


def _key_length(inputs: AttentionInputs) -> int:
    """Key length flex sees: the plan's keys, plus the segment's blocks (keys padded to whole blocks)."""
    plan, pooled = inputs.plan, inputs.pooled
    if pooled is None:
        return plan.seq_k
    return (plan.num_k_blocks + -(-pooled.num_keys // plan.block_k)) * plan.block_k


def _signature(inputs: AttentionInputs) -> tuple:
    q, v, plan, pooled = inputs.query, inputs.value, inputs.plan, inputs.pooled
    b, sq, h, d = q.shape
    return (q.device.type, _compute_dtype(inputs), b, h, sq, _key_length(inputs), d, v.shape[-1], plan.block_q,
            plan.block_k, float(inputs.scale), pooled is not None, pooled is not None and pooled.gate is not None,
            inputs.return_lse)


def _append_segment(x: torch.Tensor, seg: torch.Tensor, pad: int, tail: int) -> torch.Tensor:
    """``x`` ``[B, H, Sk, D]`` padded to whole key blocks (``pad`` zero rows), then the segment's rows padded to
    whole blocks (``tail``): one copy."""
    b, h, _, d = x.shape
    return torch.cat([x, x.new_zeros(b, h, pad, d), seg, x.new_zeros(b, h, tail, d)], dim=2)


def segment_block_mask(inputs: AttentionInputs, query: torch.Tensor):
    """The ``BlockMask`` and ``score_mod`` for a call with a pooled segment (``query`` ``[B, H, Sq, D]`` in the
    compute dtype, for the row gate). Key slot layout: the plan's ``Mk * block_k`` slots, then the segment's keys
    padded to whole blocks. Tensor ops only: no device sync."""
    from torch.nn.attention.flex_attention import BlockMask

    plan, pooled = inputs.plan, inputs.pooled
    b, h, sq = query.shape[:3]
    mq, mk, bq, bk = plan.num_q_blocks, plan.num_k_blocks, plan.block_q, plan.block_k
    nk = pooled.num_keys
    ns = -(-nk // bk)
    dev = query.device
    off = mk * bk
    slot_real = torch.cat([plan.key_slots_real(), torch.arange(ns * bk, device=dev) < nk])
    bias = torch.cat([torch.zeros(off, device=dev),
                      torch.nn.functional.pad(pooled.log_count.to(dev), (0, ns * bk - nk))]).to(query.dtype)
    read = pooled.read.expand(b, h, mq, nk)
    if pooled.gate is not None:  # |q . k_j| > |q . gate_j|, per row (same precision as the logits)
        keys, gate = (t.to(query.dtype).expand(b, h, nk, -1) for t in (pooled.keys, pooled.gate))
        row_ok = (query @ keys.transpose(-1, -2)).abs() > (query @ gate.transpose(-1, -2)).abs()
        row_ok = row_ok & read.repeat_interleave(bq, dim=2)[:, :, :sq]
    else:
        row_ok = None
    read = read.contiguous()

    def mask_mod(bi, hi, q_idx, kv_idx):
        j = (kv_idx - off).clamp(0, nk - 1)
        seg_ok = row_ok[bi, hi, q_idx, j] if row_ok is not None else read[bi, hi, q_idx // bq, j]
        return slot_real[kv_idx] & ((kv_idx < off) | seg_ok)

    def score_mod(score, bi, hi, q_idx, kv_idx):
        return score + bias[kv_idx]

    full_num, full_idx, part_num, part_idx = plan.full_split
    full_num, part_num = full_num.expand(b, h, mq), part_num.expand(b, h, mq)
    w = part_idx.shape[-1]
    full_idx, part_idx = full_idx.expand(b, h, mq, w), part_idx.expand(b, h, mq, w)
    # every query block lists the segment's blocks as partial (its mask says which pooled keys a row reads)
    pos = torch.arange(mk + ns, device=dev, dtype=torch.int32)
    count = part_num.unsqueeze(-1)
    part_idx = torch.nn.functional.pad(part_idx, (0, mk + ns - w))
    part_idx = torch.where(pos < count, part_idx, torch.where(pos < count + ns, mk + pos - count, 0))
    full_idx = torch.nn.functional.pad(full_idx, (0, mk + ns - w))
    block_mask = BlockMask.from_kv_blocks(part_num + ns, part_idx.to(torch.int32), full_num, full_idx,
                                          BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(sq, off + ns * bk))
    return block_mask, score_mod


class CompiledBackend(Backend):
    name = "compiled"
    reads_pooled_segment = True

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        q = inputs.query
        reasons = []
        if not has_flex_attention():
            reasons.append(f"torch {torch.__version__} has no flex_attention (needs torch >= 2.5)")
        if q.device.type not in _DEVICES:
            reasons.append(f"device {q.device.type!r} is not one this backend compiles for ({', '.join(_DEVICES)})")
        if q.device.type == "cpu" and not _has_cpp_compiler():
            reasons.append("torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one "
                           "(e.g. apt-get install g++)")
        d = q.shape[-1]
        if d < 16 or d & (d - 1) or inputs.value.shape[-1] != d:
            reasons.append(f"flex_attention needs one power-of-two head_dim >= 16 for queries and values, got "
                           f"{d} and {inputs.value.shape[-1]}")
        takes = (torch.float32, *_LOW) if q.device.type == "cpu" else (torch.float32, *_LOW, torch.float64)
        if q.dtype not in takes:
            reasons.append(f"compiled flex_attention on {q.device.type} takes {', '.join(map(str, takes))}, got "
                           f"{q.dtype}; the torch reference runs float64")
        if inputs.return_lse and q.device.type == "cpu":
            reasons.append(f"torch {torch.__version__}'s compiled flex_attention on CPU returns no log-sum-exp "
                           "(return_lse=True): the torch reference runs such calls (only temporal reuse's refresh "
                           "step asks for it)")
        if q.requires_grad or inputs.key.requires_grad or inputs.value.requires_grad:
            reasons.append("dit_sparse is forward-only: wrap inference in torch.no_grad()")
        sig = _signature(inputs)
        if sig not in _compile_times and len(_compile_times) >= _recompile_limit():
            reasons.append(f"this process already compiled {len(_compile_times)} shape signatures, torch._dynamo's "
                           f"recompile limit: {_describe(sig)} would run uncompiled; keep the sequence lengths "
                           "fixed or raise torch._dynamo.config.recompile_limit")
        return reasons

    def auto_reasons(self, inputs: AttentionInputs) -> list[str]:
        q = inputs.query
        if q.device.type == "cuda":
            return ["on CUDA the Triton kernels run first; the compiled path runs when named (not timed on a GPU "
                    "yet)"]
        tokens = inputs.plan.seq_k
        need = sparse_break_even(q.device.type)
        if need is None:
            return [f"no break-even measured for device {q.device.type!r} (benchmarks/break_even.py)"]
        if tokens < need:
            return [f"{tokens} keys is below the measured break-even of {need} tokens on {q.device.type}: a compile "
                    "would not pay off"]
        return []

    def forward(self, inputs: AttentionInputs):
        from torch.nn.attention.flex_attention import AuxRequest

        plan, pooled = inputs.plan, inputs.pooled
        cdtype = _compute_dtype(inputs)
        q, k, v = (t.transpose(1, 2).to(cdtype) for t in (inputs.query, inputs.key, inputs.value))
        score_mod = None
        if pooled is None:
            block_mask = plan.to_flex(eager_safe=False)
        else:
            b, h = q.shape[:2]
            pad = plan.num_k_blocks * plan.block_k - plan.seq_k
            keys = pooled.keys.to(cdtype).expand(b, h, -1, -1)
            vals = pooled.values.to(cdtype).expand(b, h, -1, -1)
            tail = -pooled.num_keys % plan.block_k
            k, v = _append_segment(k, keys, pad, tail), _append_segment(v, vals, pad, tail)
            block_mask, score_mod = segment_block_mask(inputs, q)
        sig = _signature(inputs)
        first = sig not in _compile_times
        start = time.perf_counter() if first else 0.0
        aux_request = AuxRequest(lse=True) if inputs.return_lse else None
        # not_supported_reasons refuses a signature past the limit; a call that hits it anyway raises
        res = compiled_flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=inputs.scale,
                                      return_aux=aux_request, limit=_recompile_limit(), what=_describe(sig))
        if first:
            _compile_times[sig] = time.perf_counter() - start
            logger.info("compiled backend: first call for %s took %.1f s (compiled once per shape signature)",
                        _describe(sig), _compile_times[sig])
        out, lse = res if inputs.return_lse else (res, None)
        out = out.transpose(1, 2)
        if plan.has_epilogue:
            out = apply_epilogue(out.float() if cdtype in _LOW else out, plan)
        if lse is not None:
            lse = lse.lse.to(torch.float64 if cdtype == torch.float64 else torch.float32)
        return out.to(inputs.query.dtype), lse
