"""The ``fa4`` backend: FlashAttention-4 (``flash_attn.cute``, CuTe DSL) on the plan as block-sparse tensors.

Optional: ``pip install --pre flash-attn-4`` (pre-releases only; ``flash-attn-4[cu13]`` on CUDA 13). It compiles
its kernels at the first call (no nvcc). Built against flash-attn-4 4.0.0b36; not yet run on a GPU here.

The plan goes in as FA4's ``BlockSparseTensorsTorch`` (flex's ``BlockMask`` layout) through
:meth:`SparsePlan.split_full`: key blocks whose slots are all real keys are *full* blocks (read without a mask);
blocks with padding slots (``kv_block_valid``) or the ragged tail past ``seq_k`` are *partial* ("mask") blocks.
FA4 masks keys past ``seq_k`` itself, on the first block it processes of each list, which is the list's *last*
entry: rows must be ascending (``split_full`` guarantees it) so that the ragged tail block is that entry. When the
plan has ``kv_block_valid``, partial blocks also run a CuTe ``mask_mod`` that reads a per-key validity vector (an
FA4 aux tensor), so padding slots are masked exactly. The
epilogue (``out_scale``, ``out_bias``) runs in torch after the call; the log-sum-exp comes from FA4 (natural log,
``-inf`` on rows that read no key). Building the tensors is tensor ops only (no device sync).
No pooled key segment (``pooled=``, the ``combine="row"`` presets): :meth:`FA4Backend.segment_reasons` says why
and which backends run it.

Tiles (FA4 4.0.0b36, ``interface._get_fwd_config`` / ``block_sparsity.normalize_block_sparse_config``): a sparse
key block must equal FA4's key tile (Hopper) or be a multiple of it (Blackwell), and a sparse query block a
multiple of the query tile, which is 128 rows, and 256 on Blackwell (two query stages) once ``seq_q > 128``.
:func:`tile_reasons` and :func:`head_dim_reasons` hold the rules this backend accepts.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import torch

from ..epilogue import apply_epilogue
from ..plan import SparsePlan
from .base import AttentionInputs, Backend

__all__ = ["FA4Backend", "FA4Tensors", "INSTALL_HINT", "fa4_tensors", "head_dim_reasons", "tile_reasons"]

FA4_DTYPES = (torch.float16, torch.bfloat16)
INSTALL_HINT = ("pip install --pre flash-attn-4 ('flash-attn-4[cu13]' on CUDA 13); its CuTe DSL libraries are a "
                "~92 MB wheel: see the README's backends section (and docs/testing.md#device-runs for an offline GPU "
                "machine)")


@functools.cache
def has_fa4() -> bool:
    """True when ``flash_attn.cute`` can be found (not imported: importing it loads the CuTe DSL, seconds)."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


def head_dim_reasons(head_dim: int, head_dim_v: int) -> list[str]:
    """This backend takes equal query/value head dims, a multiple of 8 in [8, 128] (FA4's range on both Hopper
    and Blackwell, where 128 is also the largest head dim that keeps the 128-wide key tile on Hopper)."""
    if head_dim != head_dim_v or head_dim % 8 or not 8 <= head_dim <= 128:
        return [f"head_dim {head_dim} (value {head_dim_v}) is not supported: query and value head dims must be "
                "equal, a multiple of 8 in [8, 128]"]
    return []


def tile_reasons(capability: tuple[int, int], block_q: int, block_k: int, seq_q: int) -> list[str]:
    """Why FA4's block-sparse forward cannot take a plan with these blocks on a GPU of this compute capability.

    Accepted: Hopper (9.x): ``block_q`` a multiple of 128 and ``block_k == 128``; Blackwell (10.x): ``block_q`` a
    multiple of 256 (of 128 when ``seq_q <= 128``) and ``block_k`` a multiple of 128. Other architectures have no
    block-sparse FA4 forward.
    """
    major, minor = capability
    if major not in (9, 10):
        return [f"compute capability {major}.{minor}: FA4's block-sparse forward runs on Hopper (9.x) and "
                "Blackwell (10.x) only"]
    if major == 9:
        if block_q % 128 or block_k != 128:
            return [f"blocks ({block_q}, {block_k}): on Hopper FA4's tiles need block_q a multiple of 128 and "
                    "block_k == 128; build the plan with block_q=block_k=128"]
        return []
    q_tile = 256 if seq_q > 128 else 128  # two query stages of 128 rows once there is more than one tile
    if block_q % q_tile or block_k % 128:
        return [f"blocks ({block_q}, {block_k}): on Blackwell FA4 needs block_q a multiple of {q_tile} (two "
                "128-row query stages) and block_k a multiple of 128; build the plan with block_q=256, "
                "block_k=128"]
    return []


class FA4Tensors(NamedTuple):
    """The plan in FA4's terms (plain torch tensors; wrapped into ``BlockSparseTensorsTorch`` at the call).

    ``mask_cnt``/``mask_idx``: partial blocks; ``full_cnt``/``full_idx``: full blocks (int32 ``[B, H, Mq]`` and
    ``[B, H, Mq, W]``, B/H possibly 1, rows ascending). ``key_valid``: int32 ``[seq_k]``, 1 for a real key, 0 for
    a padding slot; None when the plan has no ``kv_block_valid`` (FA4's own ``seq_k`` bound is then enough).
    """

    mask_cnt: torch.Tensor
    mask_idx: torch.Tensor
    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    key_valid: torch.Tensor | None
    block_size: tuple[int, int]


def fa4_tensors(plan: SparsePlan) -> FA4Tensors:
    """Convert ``plan`` (tensor ops only, no device sync): partial blocks are the read blocks that hold a padding
    slot or the ragged tail (:meth:`SparsePlan.key_block_whole` false), full blocks the rest."""
    full_num, full_idx, part_num, part_idx = plan.full_split  # cached on the plan: one sort per plan
    key_valid = None
    if plan.kv_block_valid is not None:
        key_valid = plan.key_slots_real()[:plan.seq_k].to(torch.int32)
    return FA4Tensors(part_num, part_idx, full_num, full_idx, key_valid, (plan.block_q, plan.block_k))


@functools.cache
def _key_valid_mask_mod():
    """The CuTe ``mask_mod`` of partial blocks: key ``kv`` is kept iff ``aux_tensors[0][kv] != 0``.

    FA4 calls it per score element with (batch, head, q_idx, kv_idx, seqlen_info, aux_tensors); it wraps
    ``kv_idx`` into ``[0, seq_k)`` on the block it also bounds by ``seq_k``, so the read stays in range.
    """
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute import utils

    @cute.jit
    def key_valid_mask(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        flag = utils.scalar_to_ssa(aux_tensors[0][kv_idx[0]], cutlass.Int32)
        return flag != utils.scalar_to_ssa(0, cutlass.Int32)

    return key_valid_mask


def run_fa4(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensors: FA4Tensors, scale: float,
            return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One FA4 call (``flash_attn.cute.flash_attn_func``) on ``[B, S, H, D]`` tensors; returns ``(out, lse)``."""
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    sparse = BlockSparseTensorsTorch(mask_block_cnt=tensors.mask_cnt, mask_block_idx=tensors.mask_idx,
                                     full_block_cnt=tensors.full_cnt, full_block_idx=tensors.full_idx,
                                     block_size=tensors.block_size)
    masked = tensors.key_valid is not None
    out, lse = flash_attn_func(q, k, v, softmax_scale=scale, block_sparse_tensors=sparse,
                               mask_mod=_key_valid_mask_mod() if masked else None,
                               aux_tensors=[tensors.key_valid] if masked else None, return_lse=return_lse)
    return out, lse


class FA4Backend(Backend):
    """FlashAttention-4 block-sparse forward. Only used when named (``backend="fa4"``) until the GPU suite has
    checked it against the reference and timed it: automatic dispatch skips it with "only used when named"."""

    name = "fa4"
    auto = False

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        q, v, plan = inputs.query, inputs.value, inputs.plan
        reasons = []
        if not has_fa4():
            reasons.append(f"flash-attn-4 (flash_attn.cute) is not installed: {INSTALL_HINT}")
        if not q.is_cuda:
            reasons.append(f"tensors are on {q.device}: FA4 runs on CUDA GPUs only (Hopper or Blackwell)")
        if q.dtype not in FA4_DTYPES:
            reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16); cast with .to(torch.bfloat16)")
        if q.requires_grad or inputs.key.requires_grad or v.requires_grad:
            reasons.append("dit_sparse is forward-only: wrap inference in torch.no_grad()")
        reasons += head_dim_reasons(q.shape[-1], v.shape[-1])
        if q.is_cuda:  # the tiles depend on the GPU
            reasons += tile_reasons(torch.cuda.get_device_capability(q.device), plan.block_q, plan.block_k,
                                    plan.seq_q)
        return reasons

    def segment_reasons(self, inputs: AttentionInputs) -> list[str]:
        """FA4 cannot read a pooled key segment, so no ``combine="row"`` preset runs on it: its forward takes one
        k/v tensor in the input dtype (``q.dtype == k.dtype == v.dtype``), so pooled keys appended as extra key
        blocks would be rounded from fp32 to bf16/fp16 (a logit of 30 moves by up to 0.12 in bf16: the segment's
        contract keeps them fp32), the per-row gate (``|q . k_mean| > |q . gate|``) is a second dot that neither
        its ``score_mod`` nor its ``mask_mod`` can form, and the append would copy k and v on every call."""
        if inputs.pooled is None:
            return []
        return ["backend 'fa4' does not read a pooled key segment (pooled=..., the row mode of "
                "combine='row' presets): FA4 takes keys only in the input dtype (the segment's pooled keys are "
                "fp32) and cannot form its per-row gate; run it with backend='triton' or backend='hopper' on CUDA, "
                "backend='torch' on any device, or backend=None (automatic choice), or use a combine='block' "
                "preset on fa4"]

    def forward(self, inputs: AttentionInputs):
        plan = inputs.plan
        out, lse = run_fa4(inputs.query, inputs.key, inputs.value, fa4_tensors(plan), float(inputs.scale),
                           inputs.return_lse)
        if plan.has_epilogue:
            out = apply_epilogue(out.to(torch.promote_types(out.dtype, torch.float32)), plan).to(out.dtype)
        return out, (lse.float() if inputs.return_lse else None)
