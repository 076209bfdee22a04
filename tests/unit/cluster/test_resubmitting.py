"""The requeueing base of submitted tasks: the master port a job's tasks agree on, and a finished task that ignores
a late time-limit signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from hpcdistill.cluster.resubmitting import master_port

REPO = Path(__file__).resolve().parents[3]


def test_master_port_is_shared_by_a_jobs_tasks_and_differs_between_jobs():
    assert master_port("1234") == master_port("1234") != master_port("1235")
    assert 20000 <= master_port("abc-uuid") < 40000


def test_finished_task_ignores_a_late_time_limit_signal(tmp_path):
    # The signal can land after the work is done, while the interpreter shuts down and has already put SIGUSR2 back
    # to its default action (terminate): the job's result is written, yet SLURM would record FAILED.
    script = textwrap.dedent("""
        import os, signal, sys
        from hpcdistill.cluster.resubmitting import ignore_requeue_signal
        signal.signal(signal.SIGUSR2, lambda *_: print("requeue", flush=True))  # as submitit's handler
        ignore_requeue_signal()
        os.kill(os.getpid(), signal.SIGUSR2)
        print("alive", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["alive"], done.stderr


def test_submitits_logging_bypass_is_replaced_and_nothing_else(tmp_path):
    """In a job, SIGTERM and SIGCONT keep submitit's meaning (bypassed) without its log line, inside which a
    time-limit SIGUSR2 raising "timed-out too many times" was swallowed; a handler that is not submitit's stays."""
    import signal

    from submitit.core.job_environment import SignalHandler

    from hpcdistill.cluster.resubmitting import quiet_bypassed_signals

    handler = SignalHandler.__new__(SignalHandler)  # what submitit installs, without a job around it
    mine = lambda signum, frame: None  # noqa: E731
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCONT)}
    try:
        signal.signal(signal.SIGTERM, handler.bypass)
        signal.signal(signal.SIGCONT, mine)
        quiet_bypassed_signals()
        assert signal.getsignal(signal.SIGTERM) is not handler.bypass
        assert getattr(signal.getsignal(signal.SIGTERM), "__module__", "") == "hpcdistill.cluster.resubmitting"
        assert signal.getsignal(signal.SIGCONT) is mine
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
