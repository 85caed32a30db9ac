"""Words the tools print (CLI and demo alike), kept torch-free."""

from __future__ import annotations

__all__ = ["speed_words"]


def speed_words(speedup: float) -> str:
    """``"1.25x faster"`` / ``"1.18x slower"`` (``speedup`` = dense time / sparse time)."""
    if speedup >= 1:
        return f"{speedup:.2f}x faster"
    return f"{1 / speedup:.2f}x slower"
