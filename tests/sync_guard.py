"""``no_host_sync``: a ``TorchDispatchMode`` that records every op which forces a device-to-host sync.

On CPU nothing actually waits, but the same ATen calls are what make CUDA wait: reading a value
(``_local_scalar_dense``: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)`` in an ``if``), ``nonzero`` and what
calls it (boolean-mask indexing, ``masked_select``), data-dependent output sizes (``unique``,
``repeat_interleave`` with a tensor of repeats and no ``output_size``), and ``equal``.

Some reads never reach the dispatcher on CPU: ``.tolist()``, ``.numpy()`` and ``.cpu()`` copy a CUDA tensor to the
host (a sync there) but are no-ops or direct memory reads on a CPU tensor. A ``TorchFunctionMode`` records those
calls by name, whatever the device (on the per-layer path a ``.cpu()`` of a CPU tensor is just as suspect).

Documented host reads are allowed two ways, and kept (with their reason) in ``rec.allowed`` instead of failing:

* ``no_host_sync(..., allow=(dit_sparse.integration.context.host_read,))``: every sync made inside a call of one
  of these functions (found on the stack; the reason is that call's ``why`` argument);
* ``with rec.allow(reason):`` around a body.
"""

from __future__ import annotations

import contextlib
import sys
import traceback

import torch
from torch.overrides import TorchFunctionMode
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


#: tensor methods that copy to the host on CUDA but dispatch nothing (or a no-op) on a CPU tensor
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2]
              if "site-packages" not in f.filename and "/lib/python" not in f.filename]
    return "".join(traceback.format_list(frames[-6:]))


class _Recorder(TorchDispatchMode):
    def __init__(self, allow=()):
        super().__init__()
        self.hits: list[str] = []
        self.allowed: list[str] = []
        self.paused = 0
        self._allow_codes = {fn.__code__ for fn in allow}

    def _allowed_by(self) -> str | None:
        """The ``why`` of the innermost allowed function on the stack, or None."""
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in self._allow_codes:
                return str(frame.f_locals.get("why", frame.f_code.co_name))
            frame = frame.f_back
        return None

    def record(self, what: str) -> None:
        if self.paused:
            return
        why = self._allowed_by() if self._allow_codes else None
        if why is not None:
            self.allowed.append(why)
        else:
            self.hits.append(f"{what}\n" + _where())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    def __init__(self, rec: _Recorder):
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.rec.record(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(what: str = "the call", allow=()):
    """Fail (AssertionError naming each op and where it came from) if the body runs an op that syncs.

    Yields the recorder; syncs inside a call of a function in ``allow``, or in a ``rec.allow(reason)`` body, are
    documented reads: kept in ``rec.allowed`` (their reasons), not failures.
    """
    rec = _Recorder(allow)

    @contextlib.contextmanager
    def allow(reason: str):
        rec.allowed.append(reason)
        rec.paused += 1
        try:
            yield
        finally:
            rec.paused -= 1

    rec.allow = allow
    with rec, _HostReads(rec):
        yield rec
    if rec.hits:
        raise AssertionError(f"{what} forced {len(rec.hits)} device-to-host sync(s); first ones:\n\n"
                             + "\n\n".join(rec.hits[:3]))
