"""The base of every callable submitit runs on the cluster (training, evaluation, sharding and prediction tasks):
small and picklable, its `checkpoint()` only resubmits it, and a finished task ignores a late requeue signal."""

from __future__ import annotations

import signal
import threading
import zlib
from typing import Any

from hpcdistill.common.provenance import current_command, record_command


def master_port(job_id: str) -> int:
    """A port every task of one job agrees on, distinct for concurrent jobs (ids differ) on a shared node."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + number % 20000


def ignore_requeue_signal() -> None:
    """Called when a task's work is done. A time-limit signal after this point must not requeue the finished job
    (submitit's handler would), nor kill it: Python resets its handlers to the default action while the interpreter
    shuts down, and SIGUSR2's default is to terminate, which turns a job that has written its result into FAILED."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # SIG_IGN survives interpreter shutdown; handlers do not


def _ignore(signum: int, frame: Any) -> None:
    """What submitit's bypass does with SIGTERM and SIGCONT, without its log line."""


def quiet_bypassed_signals() -> None:
    """submitit bypasses SIGTERM and SIGCONT with a handler that writes a log line. SLURM sends SIGCONT with the
    time-limit SIGUSR2; when SIGUSR2's handler lands inside that log write and raises (a task out of requeues ends
    with "timed-out too many times"), logging's error handler swallows the exception, the task trains on and SLURM
    kills it at the limit (seen in CI). The same bypass, silent: nothing can land inside a write that is not there."""
    if threading.current_thread() is threading.main_thread():
        for bypassed in (signal.SIGTERM, signal.SIGCONT):
            owner = getattr(signal.getsignal(bypassed), "__self__", None)  # a bound method's object, if it is one
            if type(owner).__module__.startswith("submitit"):  # only submitit's bypass: never the CLI's own handler
                signal.signal(bypassed, _ignore)


class Resubmitting:
    """A submitted callable: `run()` is its work. On timeout or preemption submitit calls `checkpoint()`, which
    resubmits the same callable; each task's work resumes from what it saved (checkpoints, journals) or, when it is
    idempotent, is redone whole. Requeues are bounded by the executor's max_num_timeout (`max_requeue`)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Resubmitting:
        # The command that launched it (`hpcdistill launch ...`), pickled with it: the job's provenance names it
        # rather than submitit's own entry point.
        task = super().__new__(cls)
        task.launch_command = current_command()
        return task

    def run(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> Any:
        record_command(getattr(self, "launch_command", None) or current_command())
        quiet_bypassed_signals()
        result = self.run()
        ignore_requeue_signal()
        return result

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)
