"""Backend registry and dispatch.

Priority for automatic choice: ``sdpa`` (all-dense plans only) -> ``fa4`` (flash-attn-4, CUDA; opt-in, see
below) -> ``hopper`` (CUDA sm90+; opt-in, see below) -> ``triton`` (CUDA) -> ``flex`` (CUDA) -> ``compiled``
(``torch.compile(flex_attention)`` with the pooled segment; automatic on CPU from the measured break-even,
:mod:`dit_sparse.backends.break_even`) -> ``torch`` (the reference; always runs). On GPUs the order is by
design and unmeasured: no GPU run has timed these backends against each other yet
(``benchmarks/gpu_suite.py``, which iterates over :data:`BACKENDS`, will; the order follows the numbers then).
``fa4`` sits first because FA4 is the FA3-class kernel the issue aims for, but it is ``auto = False`` (used only
when named) until a GPU run has checked it against the reference and timed it; then it is one line to switch on.
``hopper`` (our Triton kernel for sm90+: TMA descriptors, full/partial block loops, conditional rescaling) has
only run in the Triton interpreter so far, so it is ``auto = False`` as well: automatic dispatch runs the portable
``triton`` kernel on every CUDA GPU until the suite has compiled, checked and timed ``hopper`` on sm90.

A backend named explicitly (argument, :func:`use_backend` context or ``DIT_SPARSE_BACKEND``) that cannot run raises
``NotImplementedError`` with its reasons; there is no silent fallback. Skipped backends are logged at DEBUG on
the ``dit_sparse.backends`` logger.
"""

from __future__ import annotations

import contextlib
import contextvars

from .._env import env_backend
from .._logging import get_logger
from .base import AttentionInputs, Backend
from .compiled import CompiledBackend
from .dense import SDPABackend, XFormersBackend
from .fa4 import FA4Backend
from .flex import FlexBackend
from .hopper import HopperBackend
from .torch_ref import TorchBackend
from .triton import TritonBackend

__all__ = ["BACKENDS", "AttentionInputs", "Backend", "available_backends", "choose_backend", "use_backend"]

logger = get_logger("dit_sparse.backends")

#: registry in automatic-dispatch priority order
BACKENDS: dict[str, Backend] = {b.name: b for b in (SDPABackend(), FA4Backend(), HopperBackend(), TritonBackend(),
                                                    FlexBackend(), CompiledBackend(), XFormersBackend(),
                                                    TorchBackend())}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("dit_sparse_backend", default=None)


def _lookup(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"Unknown backend {name!r}; expected one of {sorted(BACKENDS)} or None for "
                         "automatic choice.") from None


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend inside a ``with`` block (``None`` restores automatic choice)."""
    if name is not None:
        _lookup(name)
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


_said: set[str] = set()


def _fallback_once(reasons: list[str]) -> None:
    """Say once per kind of reason why the torch reference runs a call instead of the compiled backend."""
    kind = reasons[0].split(":")[0][:48]
    if kind not in _said:
        _said.add(kind)
        logger.info("dit_sparse: the torch reference runs this call, not the compiled backend: %s (said once)",
                    "; ".join(reasons))


def available_backends(inputs: AttentionInputs) -> dict[str, list[str]]:
    """``{backend name: reasons it cannot run}`` for these inputs (empty list = can run)."""
    return {name: b.not_supported_reasons(inputs) + b.segment_reasons(inputs) for name, b in BACKENDS.items()}


def choose_backend(inputs: AttentionInputs, name: str | None = None) -> Backend:
    """The backend that will run ``inputs``: the named one (argument > context > env var) or the first that fits."""
    name = name or _forced.get() or env_backend()
    if name is not None:
        backend = _lookup(name)
        reasons = backend.not_supported_reasons(inputs) + backend.segment_reasons(inputs)
        if reasons:
            raise NotImplementedError(f"backend={name!r} cannot run {inputs.describe()}:\n  - " + "\n  - ".join(
                reasons) + "\nPass backend=None for automatic choice, or fix the inputs as listed.")
        return backend
    tried = {}
    for backend in BACKENDS.values():
        reasons = backend.not_supported_reasons(inputs) + backend.segment_reasons(inputs)
        reasons += backend.auto_reasons(inputs) if backend.auto else ["only used when named"]
        if not reasons:
            if backend.name == "torch" and "compiled" in tried:
                _fallback_once(tried["compiled"])
            return backend
        tried[backend.name] = reasons
        logger.debug("backend %s skipped: %s", backend.name, "; ".join(reasons))
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in tried.items())
    raise NotImplementedError(f"No backend can run {inputs.describe()}:\n{lines}")  # pragma: no cover
