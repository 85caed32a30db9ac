"""Pipeline factories: the presets (:mod:`.presets`) and ``load_pipeline`` (:mod:`.loaders`).

Names load lazily, so the torch-free tools can read the presets and ``looks_like_hub_id`` without importing torch.
"""

from __future__ import annotations

_LAZY = {
    "PRESETS": "presets",
    "Preset": "presets",
    "get_preset": "presets",
    "list_presets": "presets",
    "load_pipeline": "loaders",
    "looks_like_hub_id": "loaders",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
