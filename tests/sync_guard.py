"""``no_host_sync``: a ``TorchDispatchMode`` that records every op which forces a device-to-host sync.

On CPU nothing actually waits, but the same ATen calls are what make CUDA wait: reading a value
(``_local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` in an ``if``), ``nonzero`` and what
calls it (boolean-mask indexing, ``masked_select``), data-dependent output sizes (``unique``,
``repeat_interleave`` with a tensor of repeats and no ``output_size``), and ``equal``.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

SYNC_OPS = {
    aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default,
    aten.equal.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
    aten.unique_consecutive.default, aten.allclose.default,
}
_MASK_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _is_sync(func, args, kwargs) -> bool:
    if func in SYNC_OPS:
        return True
    if func in _MASK_INDEXING:  # a bool/uint8 index runs nonzero inside the kernel
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or []))
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    return False


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "site-packages" not in f.filename and "/lib/python" not in f.filename]
            self.hits.append(f"{func}\n" + "".join(traceback.format_list(frames[-6:])))
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(what: str = "the call"):
    """Fail (AssertionError naming each op and where it came from) if the body runs an op that syncs."""
    rec = _Recorder()
    with rec:
        yield rec
    if rec.hits:
        raise AssertionError(f"{what} forced {len(rec.hits)} device-to-host sync(s); first ones:\n\n"
                             + "\n\n".join(rec.hits[:3]))
