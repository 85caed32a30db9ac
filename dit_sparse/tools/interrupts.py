"""Ctrl-C in the console script, the same at any point of a run (torch-free).

Python's own SIGINT handler raises ``KeyboardInterrupt`` at whatever line runs, and a few places swallow it: a
finaliser (``__del__``, e.g. ``regex``'s ``Group.__del__`` while a tokenizer loads) prints "Exception ignored" and
goes on, as do weakref and gc callbacks, and a library that turns it into another exception makes it a job failure.
:func:`handling` (``dit-sparse`` installs it for the whole command) replaces that handler with one that

* records every Ctrl-C (:func:`requested` stays true for the rest of the command), then
* raises ``KeyboardInterrupt`` at once, as Python would, except inside a finaliser or a :func:`deferred` block.

Safe points call :func:`check` (it raises when a Ctrl-C was recorded): after the model loads, before and after each
job, at every transformer forward (each denoising step), before a job's files are written and at the end of each
:func:`deferred` block. A Ctrl-C that something swallowed is therefore raised at the next safe point; nothing can
lose it. :func:`deferred` wraps the short critical writes (a summary, the rename and clean-up of an atomic write):
a Ctrl-C there is raised when the block ends, so a file is either whole or absent.

Without :func:`handling` (library use, Ray actors) nothing changes: :func:`requested` is false and :func:`check` and
:func:`deferred` do nothing.
"""

from __future__ import annotations

import contextlib
import signal

__all__ = ["handling", "deferred", "check", "requested", "finishing"]


class _State:
    installed = False
    count = 0  # Ctrl-Cs received
    depth = 0  # open deferred() blocks


_state = _State()


def _in_finaliser(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame) -> None:
    _state.count += 1
    if _state.depth or _in_finaliser(frame):
        return  # raised by the next check() / the end of the deferred block
    raise KeyboardInterrupt


def requested() -> bool:
    """A Ctrl-C came during this :func:`handling` block (also one that was swallowed)."""
    return _state.count > 0


def check() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C came (a safe point); does nothing otherwise."""
    if _state.count and not _state.depth:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred():
    """A critical section: a Ctrl-C inside it is raised when it ends (unless an exception leaves it already)."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    check()


def finishing() -> None:
    """The command is ending on a Ctrl-C (its last line is being printed): further ones are only recorded."""
    if _state.installed:
        _state.depth += 1


@contextlib.contextmanager
def handling():
    """Record and raise Ctrl-C as the module docstring says, for the ``with`` block (main thread only). SIGINT left
    ignored by the parent (``nohup``, a background job of a non-interactive shell) stays ignored."""
    import threading

    if threading.current_thread() is not threading.main_thread() or _state.installed:
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    _state.count, _state.depth, _state.installed = 0, 0, True
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state.installed, _state.depth, _state.count = False, 0, 0
