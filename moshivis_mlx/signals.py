"""SIGTERM and SIGHUP stop a run the way Ctrl-C does, so one path cleans up after all three.

`stop_on_signals()` (entered by `errors.guard`, around every entry point) makes SIGTERM
(`kill`, a service manager) and SIGHUP (the terminal closed) raise `Stopped`, a
`KeyboardInterrupt`: every `finally` and `except BaseException` that saves a recording or
removes a half-written bundle runs for them as for Ctrl-C, and the exit status is
128 + the signal's number (130, 143, 129).

`shielded()` protects the cleanup itself: while a session is being saved or a staging
directory removed, a second Ctrl-C (or SIGTERM) is held back and raised once the block is
done, instead of cutting the save in half. SIGKILL cannot be caught; what survives it is
what was already on disk (the recordings flush as they go, see app/recorder.py).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
                     if s is not None)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived (SIGINT arrives as a plain KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(e: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the run (130 for Ctrl-C)."""
    return 128 + getattr(e, "signum", signal.SIGINT)


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _restore(previous: dict) -> None:
    for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise `Stopped` in the main thread while the block runs."""
    if not _main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_stopped) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def shielded() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (then the first of them is
    raised), so a save or a cleanup is never cut short."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    sigs = (signal.SIGINT, *STOP_SIGNALS)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        _restore(previous)
    if pending:
        if pending[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped(pending[0])
