"""Logger and warn-once helper (per-layer paths run 40 layers x 50 steps: never flood the log)."""

from __future__ import annotations

import logging
import warnings

__all__ = ["get_logger", "warn_once"]

_seen: set[str] = set()


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("dit_sparse") else f"dit_sparse.{name}")


def warn_once(message: str, category: type[Warning] = UserWarning, key: str | None = None) -> None:
    """Emit ``message`` as a warning the first time ``key`` (default: the message) is seen in this process."""
    key = message if key is None else key
    if key in _seen:
        return
    _seen.add(key)
    warnings.warn(message, category, stacklevel=3)
