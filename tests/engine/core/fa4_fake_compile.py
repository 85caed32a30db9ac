"""Compile the ``fa4`` backend's FA4 call for one architecture in FA4's fake-tensor mode (no GPU, no launch).

    python tests/engine/core/fa4_fake_compile.py 90     # or 100; needs flash-attn-4 installed

FA4 reads the architecture from ``FLASH_ATTENTION_ARCH`` once per process, so each architecture is its own run.
Prints one ``compiled`` line per accepted plan (unpadded, padded: the key-validity ``mask_mod`` is traced) and one
``refused`` line for block sizes FA4 rejects, checking that ``tile_reasons`` agrees on all three.
"""

from __future__ import annotations

import os
import sys

ARCH = sys.argv[1] if len(sys.argv) > 1 else "90"
os.environ["FLASH_ATTENTION_ARCH"] = f"sm_{ARCH}"
os.environ["CUTE_DSL_ARCH"] = f"sm_{ARCH}a"
os.environ["FLASH_ATTENTION_NUM_SMS"] = "132"

import cutlass.utils  # noqa: E402
import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from dit_sparse import SparsePlan  # noqa: E402
from dit_sparse.backends.fa4 import fa4_tensors, run_fa4, tile_reasons  # noqa: E402


class _NoDriverHardwareInfo:
    """The sm_100 scheduler asks the driver for the SM count while compiling; a CPU machine has no driver."""

    def get_device_multiprocessor_count(self) -> int:
        return 148


cutlass.utils.HardwareInfo = _NoDriverHardwareInfo


def compile_once(block_q: int, block_k: int, padded: bool) -> None:
    cap = (int(ARCH[:-1]), int(ARCH[-1]))
    seq_q, seq_k = 3 * block_q - 40, 5 * block_k - 17
    mq, mk = -(-seq_q // block_q), -(-seq_k // block_k)
    mask = torch.rand(1, 2, mq, mk, generator=torch.Generator().manual_seed(0)) < 0.6
    kbv = torch.full((mk,), block_k, dtype=torch.int32) if padded else None
    if padded:
        kbv[1] = block_k - 28
    plan = SparsePlan.from_dense(mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
                                 kv_block_valid=kbv)
    t = fa4_tensors(plan)
    expect_ok = not tile_reasons(cap, block_q, block_k, seq_q)
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes and dtypes only: FA4 compiles, nothing runs

        def fake(x):
            return None if x is None else torch.empty(x.shape, dtype=x.dtype, device="cuda")

        t = t._replace(mask_cnt=fake(t.mask_cnt), mask_idx=fake(t.mask_idx), full_cnt=fake(t.full_cnt),
                       full_idx=fake(t.full_idx), key_valid=fake(t.key_valid))
        q = torch.empty(2, seq_q, 2, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(2, seq_k, 2, 128, dtype=torch.bfloat16, device="cuda")
        try:
            out, lse = run_fa4(q, k, k, t, 0.1, True)
        except ValueError as e:
            assert not expect_ok, f"FA4 refused blocks ({block_q}, {block_k}) that tile_reasons accepts: {e}"
            print(f"sm_{ARCH} blocks ({block_q}, {block_k}): refused by FA4 and by tile_reasons ({e})")
            return
    assert expect_ok, f"FA4 took blocks ({block_q}, {block_k}) that tile_reasons refuses"
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 2, seq_q) and lse.dtype == torch.float32
    print(f"sm_{ARCH} blocks ({block_q}, {block_k}) padded={padded}: compiled")


if __name__ == "__main__":
    good = (128, 128) if ARCH == "90" else (256, 128)
    compile_once(*good, padded=False)
    compile_once(*good, padded=True)
    compile_once(*((128, 256) if ARCH == "90" else (128, 128)), padded=False)
