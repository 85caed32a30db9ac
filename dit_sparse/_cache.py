"""``tensor_cache``: a bounded memo for functions that build constant tensors (layout indices, static masks).

``functools.lru_cache`` is opaque to ``torch.compile``: dynamo ignores it and traces the wrapped function, so a
compiled sparse call rebuilt layout indices every time (with a ``nonzero``: a graph break and a host sync). A
plain dict lookup is traced instead, and a hit (every call after warm-up) enters the graph as constant inputs.
"""

from __future__ import annotations

import functools

__all__ = ["tensor_cache"]


def tensor_cache(maxsize: int = 64):
    """Memoize ``fn(*args)`` (hashable positional args) in a dict; the oldest entry goes past ``maxsize``."""

    def decorate(fn):
        cache: dict = {}

        @functools.wraps(fn)
        def wrapper(*args):
            hit = cache.get(args)
            if hit is None:
                hit = fn(*args)
                if len(cache) >= maxsize:
                    cache.pop(next(iter(cache)))
                cache[args] = hit
            return hit

        wrapper.cache_clear = cache.clear
        return wrapper

    return decorate
