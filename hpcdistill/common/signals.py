"""How a command ends on SIGINT (Ctrl-C) or SIGTERM (what SLURM and most schedulers send first): the signal becomes
an `Interrupted` exception in the main thread, so the work in hand unwinds (temporary files go, progress says
"interrupted") and the CLI prints one line and exits 128 + the signal number. A library callback that swallows the
exception (pyvips' cffi callbacks print and drop it) cannot hide the signal: the long loops call `check_interrupted`,
which raises it again. Training defers it (`deferred`): the signal is only recorded and the loop raises at its next
step or validation tissue, never inside a checkpoint save or a library's lock."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals seen since `interruptible` was entered (the first one ends the command)
_deferred: list[bool] = [False]  # inside `deferred()`: record only, the loop raises at its next check


class Interrupted(BaseException):  # noqa: N818 -- a BaseException, like KeyboardInterrupt: `except Exception` passes it
    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: Any) -> None:
    _received.append(signum)
    if not _deferred[0] and not _in_library_callback(frame):
        raise Interrupted(signum)


# pyvips' entries from C into Python: its log handler, and the progress callback that lets a long libvips
# computation be stopped (slides.backends kills it when a signal has been recorded).
_LIBRARY_CALLBACKS = ("_log_handler_callback", "_marshal_image_progress")


def _in_library_callback(frame: Any) -> bool:
    """Whether the signal landed inside a C library's callback into Python (pyvips' log handler, via cffi): an
    exception raised there is printed with a traceback and dropped, so it is only recorded, and the loop's next
    `check_interrupted` raises it."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in _LIBRARY_CALLBACKS or "cffi" in code.co_filename:
            return True
        frame = frame.f_back
    return False


@contextmanager
def deferred() -> Iterator[None]:
    """Within: a signal is recorded, not thrown into whatever runs (a checkpoint save, a library holding a lock that
    its close() then waits on forever); the loop ends at its next `check_interrupted`, within one step."""
    _deferred[0] = True
    try:
        check_interrupted()
        yield
    finally:
        _deferred[0] = False


@contextmanager
def interruptible() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise `Interrupted` (the previous handlers come back after)."""
    previous = {s: signal.getsignal(s) for s in HANDLED}
    _received.clear()
    for s in HANDLED:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def signal_pending() -> bool:
    """Whether a signal has arrived (for a library callback that stops its own work, e.g. libvips' kill)."""
    return bool(_received)


def check_interrupted() -> None:
    """Raise `Interrupted` if a signal arrived and its exception was swallowed on the way."""
    if _received:
        raise Interrupted(_received[0])


def ignore_interrupts() -> None:
    """For worker processes: the parent handles Ctrl-C and SIGTERM and stops them itself (no traceback per worker)."""
    for s in HANDLED:
        signal.signal(s, signal.SIG_IGN)
