"""Environment flags and optional-dependency detection, computed once (imports never fail because of them)."""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["has_triton", "triton_interpret", "has_flex_attention", "has_xformers", "env_backend", "checks_enabled",
           "autotune_mode"]


@functools.cache
def has_triton() -> bool:
    """True when ``import triton`` works (GPU kernels, or the interpreter on CPU)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def has_flex_attention() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def has_xformers() -> bool:
    """Detected without importing xformers (it has no CPU ops and is slow to import)."""
    return importlib.util.find_spec("xformers") is not None


def env_backend() -> str | None:
    """The backend named by ``DIT_SPARSE_BACKEND`` (None or "auto" means automatic choice)."""
    name = os.environ.get("DIT_SPARSE_BACKEND", "").strip().lower()
    return None if name in ("", "auto") else name


def checks_enabled() -> bool:
    """``DIT_SPARSE_CHECKS=1`` turns on expensive plan content checks on every call."""
    return os.environ.get("DIT_SPARSE_CHECKS", "0") == "1"


#: values of ``DIT_SPARSE_AUTOTUNE``
AUTOTUNE_MODES = ("full", "quick")


def autotune_mode() -> str:
    """``DIT_SPARSE_AUTOTUNE``: ``full`` (default; the Triton kernels benchmark every pruned tile config) or
    ``quick`` (one config per autotune key, nothing benchmarked: tests, where compiles dominate)."""
    mode = os.environ.get("DIT_SPARSE_AUTOTUNE", "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"DIT_SPARSE_AUTOTUNE must be one of {AUTOTUNE_MODES}, got {mode!r}; unset it for the "
                         "full autotune space.")
    return mode
