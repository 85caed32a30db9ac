"""The measured break-even: from how many tokens a sparse call beats dense SDPA on a device.

``benchmarks/break_even.py`` measures it (the compiled sparse op at the presets' density against dense SDPA, same
shapes, same run) and writes ``break_even.json`` beside this file; the package ships that file. Two readers:

* automatic dispatch, which sends sparse calls below it to the torch reference rather than compile for them
  (:class:`~dit_sparse.backends.compiled.CompiledBackend`);
* ``DensePolicy(min_tokens="auto")``, which runs such calls dense (:mod:`dit_sparse.methods.engine`).

A device with no measurement has no break-even (``None``): nothing is decided from a guess.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["BREAK_EVEN_FILE", "break_even_record", "sparse_break_even"]

BREAK_EVEN_FILE = Path(__file__).with_name("break_even.json")


@functools.cache
def break_even_record() -> dict:
    """The stored measurement: ``{device type: {"tokens": int, ...how it was measured}}`` (empty without a file)."""
    if not BREAK_EVEN_FILE.exists():
        return {}
    data = json.loads(BREAK_EVEN_FILE.read_text())
    for dev, rec in data.get("devices", {}).items():
        tokens = rec.get("tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise ValueError(f"{BREAK_EVEN_FILE}: devices.{dev}.tokens must be an int >= 0, got {tokens!r}; rerun "
                             "python benchmarks/break_even.py to rewrite it.")
    return data.get("devices", {})


def sparse_break_even(device_type: str) -> int | None:
    """Tokens (keys per call) from which the compiled sparse op beats dense SDPA on ``device_type``; None when
    that device was never measured."""
    rec = break_even_record().get(device_type)
    return None if rec is None else rec["tokens"]
