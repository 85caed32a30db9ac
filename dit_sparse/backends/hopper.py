"""The ``hopper`` backend: the Hopper (sm90+) kernel of ``kernels/block_sparse_attn_hopper.py`` as a
``torch.library`` custom op. NOT YET RUN ON A GPU: like ``fa4`` it is ``auto = False`` (used only when named,
``backend="hopper"``) until ``benchmarks/gpu_suite.py`` has compiled it on sm90, checked it against the reference
and timed it against ``triton``; then it is one line to put it into automatic dispatch, before ``triton``.

It reads the plan as full and partial key blocks (:attr:`SparsePlan.full_split`, cached on the plan, sync-free).
On CPU it runs in Triton's interpreter when ``TRITON_INTERPRET=1`` and is named (tests); automatic dispatch
never picks it. Named, it needs a CUDA device of compute capability >= 9.0. Which path the kernel takes (TMA
descriptors or pointer loads, and why) is logged at DEBUG on ``dit_sparse.backends``, once per distinct path.
"""

from __future__ import annotations

import torch

from .._env import has_triton, triton_interpret
from .._logging import get_logger
from .base import AttentionInputs
from .triton import TritonBackend, kernel_input_reasons, kernel_op, kernel_operands, unit_stride_qkv

logger = get_logger("dit_sparse.backends")
_logged: set[str] = set()


#: the kernel's switches (:class:`~dit_sparse.kernels.block_sparse_attn_hopper.HopperOptions`) as op operands;
#: ``tma`` is -1 (None: wherever the inputs qualify), 0 or 1
SWITCH_OPERANDS = (("split_full", bool), ("rescale_threshold", float), ("tma", int), ("warp_specialize", bool))


def _switches(options) -> dict:
    """``options`` as :data:`SWITCH_OPERANDS` by name."""
    return dict(split_full=options.split_full, rescale_threshold=float(options.rescale_threshold),
                tma=-1 if options.tma is None else int(options.tma), warp_specialize=options.warp_specialize)


def _launch_hopper(*, split_full: bool, rescale_threshold: float, tma: int, warp_specialize: bool, **operands):
    from ..kernels.block_sparse_attn_hopper import HopperOptions, block_sparse_attn_hopper_fwd

    options = HopperOptions(split_full=split_full, rescale_threshold=rescale_threshold,
                            tma=None if tma < 0 else bool(tma), warp_specialize=warp_specialize)
    return block_sparse_attn_hopper_fwd(**operands, options=options)


#: the plan as the kernel reads it, :attr:`SparsePlan.full_split`'s four tables
_TABLES = tuple((name, torch.Tensor) for name in ("full_num", "full_idx", "partial_num", "partial_idx"))
_hopper_op = kernel_op("block_sparse_attn_hopper", _TABLES, _launch_hopper, switches=SWITCH_OPERANDS)


class HopperBackend(TritonBackend):
    """The Hopper kernel (a :class:`TritonBackend` with its own kernel, reasons and switches). ``options``
    (:class:`~dit_sparse.kernels.block_sparse_attn_hopper.HopperOptions`) holds its switches;
    replace it (``BACKENDS["hopper"].options = HopperOptions(...)``) to measure them."""

    name = "hopper"
    reads_pooled_segment = True
    #: never compiled on a GPU yet: named only (``backend="hopper"``) until the GPU suite has checked and timed it
    auto = False

    def __init__(self, options=None):
        self._options = options

    @property
    def options(self):
        if self._options is None:
            from ..kernels.block_sparse_attn_hopper import HopperOptions

            self._options = HopperOptions()
        return self._options

    @options.setter
    def options(self, value) -> None:
        from ..kernels.block_sparse_attn_hopper import HopperOptions

        if not isinstance(value, HopperOptions):
            raise ValueError(f"HopperBackend.options must be a HopperOptions, got {type(value).__name__}.")
        self._options = value

    def not_supported_reasons(self, inputs: AttentionInputs) -> list[str]:
        q = inputs.query
        reasons = []
        if not has_triton():
            return ["triton is not installed: pip install 'dit_sparse[triton]'"]
        if q.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(q.device)
            if major < 9:
                reasons.append(f"compute capability {major}.{minor} < 9.0: the Hopper kernel needs sm90+ (TMA, "
                               "warpgroup MMA); backend='triton' runs the portable kernel here")
        elif q.device.type == "cpu":
            if not triton_interpret():
                reasons.append("tensors are on CPU and TRITON_INTERPRET is not 1 (the Hopper kernel needs an sm90+ "
                               "GPU; use backend='torch' on CPU)")
        else:
            reasons.append(f"device {q.device} is not supported (CUDA sm90+, or CPU in the Triton interpreter)")
        reasons += kernel_input_reasons(inputs)
        opts = self.options
        if opts.warp_specialize:
            from ..kernels.block_sparse_attn_hopper import has_warp_specialize

            if not has_warp_specialize():
                import triton

                reasons.append("HopperOptions(warp_specialize=True) needs Triton >= 3.4 (tl.range(warp_specialize=)), "
                               f"this is {triton.__version__}")
        if opts.tma and not reasons:
            from ..kernels.block_sparse_attn_hopper import tma_reasons

            reasons += [f"HopperOptions(tma=True): {r}" for r in tma_reasons(*unit_stride_qkv(inputs))]
        return reasons

    def describe(self, inputs: AttentionInputs) -> str:
        """Which kernel path these inputs take (TMA or pointer loads and why; the switches)."""
        from ..kernels.block_sparse_attn_hopper import kernel_path

        return kernel_path(*unit_stride_qkv(inputs), self.options)

    def forward(self, inputs: AttentionInputs):
        plan, opts = inputs.plan, self.options
        q, k, v = unit_stride_qkv(inputs)
        b, h = q.shape[0], q.shape[2]
        if logger.isEnabledFor(10):  # DEBUG: say which path ran, once per distinct path
            path = self.describe(inputs)
            if path not in _logged:
                _logged.add(path)
                logger.debug("%s (%s)", path, inputs.describe())
        plan.expand(b, h)  # the plan's own error when its batch/head dims do not broadcast
        full_num, full_idx, part_num, part_idx = plan.full_split
        mq, w = full_idx.shape[-2:]
        tables = (full_num.expand(b, h, mq), full_idx.expand(b, h, mq, w), part_num.expand(b, h, mq),
                  part_idx.expand(b, h, mq, w))
        out, lse = _hopper_op(q, k, v, *tables, **kernel_operands(inputs, b, h), **_switches(opts))
        return out, (lse if inputs.return_lse else None)
