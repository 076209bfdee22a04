"""A signal that lands inside a library's callback into Python (pyvips' log handler, called through cffi, which
prints and drops any exception) is recorded, not raised there, and the next check raises it: never swallowed, never
a printed traceback."""

from __future__ import annotations

import os
import signal

import pytest

from hpcdistill.common.signals import Interrupted, check_interrupted, interruptible


def _log_handler_callback() -> str:  # named as pyvips' callback, which cffi calls from libvips' threads
    os.kill(os.getpid(), signal.SIGINT)
    return "the callback finished"


def test_a_signal_inside_a_library_callback_is_raised_at_the_next_check_not_inside_it():
    with interruptible():
        assert _log_handler_callback() == "the callback finished"  # no exception thrown into the callback
        with pytest.raises(Interrupted) as info:
            check_interrupted()
    assert info.value.exit_code == 130


def test_a_signal_elsewhere_raises_at_once():
    with interruptible(), pytest.raises(Interrupted):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes
            pass
