"""Runs a launch's job graph on this machine (`launch --cluster local|debug`), where submitit has no dependencies.

A task starts as soon as the jobs it waits for are done (afterok: every task of them; aftercorr: the task of the
same magnification), with at most as many CPU threads busy as the machine has cores, so a baseline trains beside the
teacher and the short low-magnification tasks fill the cores the long ones leave. GPU jobs run one at a time (local
submitit jobs all see the same GPUs). `debug` runs one task at a time, in plan order, in this process. Each task
computes the same thing however it is scheduled: it is one process with its own seeds and threads.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from hpcdistill.cluster.launch_record import job_record, record_submission, store_result
from hpcdistill.common.errors import LaunchError
from hpcdistill.common.progress import LiveStatus
from hpcdistill.common.signals import Interrupted


class LocalRunner:
    """One scheduling loop over (job, task index) pairs; `save()` persists the launch record after each change."""

    def __init__(
        self,
        jobs: list[Any],
        callables: dict[str, list[Any]],
        folder: Path,
        cluster: str,
        record: dict[str, Any],
        save: Callable[[], None],
    ):
        import submitit

        self.jobs, self.callables, self.record, self.save = jobs, callables, record, save

        self.entries = {job.key: job_record(job) for job in jobs}
        record["jobs"] = list(self.entries.values())
        self.pending = [(job, i) for job in jobs for i in range(len(job.tasks))]
        self.running: list[tuple[Any, int, Any]] = []
        self.cores = 1 if cluster == "debug" else max(1, os.cpu_count() or 1)
        self.executors = {}
        for job in jobs:
            r = job.resources
            if cluster == "debug":
                self.executors[job.key] = submitit.DebugExecutor(folder=folder / "%j")
            else:
                ex = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=r.max_requeue, python=r.python)
                ex.update_parameters(
                    timeout_min=r.timeout_min,
                    tasks_per_node=r.tasks,
                    gpus_per_node=r.gpus_per_node,
                    signal_delay_s=r.signal_delay_s,
                )
                self.executors[job.key] = ex

    def task_done(self, key: str, index: int | None = None) -> bool:
        tasks = self.entries[key]["tasks"]
        return all(t["state"] == "COMPLETED" for t in (tasks if index is None else [tasks[index]]))

    def ready(self, job: Any, index: int) -> bool:
        return all(self.task_done(k) for k in job.after_ok) and all(self.task_done(k, index) for k in job.after_corr)

    def fits(self, job: Any) -> bool:
        """Enough idle cores (a task bigger than the machine runs alone), and no other GPU job running."""
        if not self.running:
            return True
        busy = sum(j.resources.tasks * j.resources.cpus_per_task for j, _, _ in self.running)
        gpu_busy = any(j.resources.gpus_per_node for j, _, _ in self.running)
        need = job.resources.tasks * job.resources.cpus_per_task
        return busy + need <= self.cores and not (gpu_busy and job.resources.gpus_per_node)

    def start(self, job: Any, index: int) -> None:

        sub = self.executors[job.key].submit(self.callables[job.key][index])
        self.entries[job.key].setdefault("started", time.time())
        record_submission(self.entries[job.key], index, sub)
        self.running.append((job, index, sub))

    def finish(self, job: Any, index: int, sub: Any) -> None:
        """Store a finished task's result; a failure cancels the running tasks and raises one line."""

        task = self.entries[job.key]["tasks"][index]
        try:
            store_result(job.key, sub, task)
        except LaunchError:
            for _, _, other in self.running:
                stop_job(other)
            raise
        if self.task_done(job.key):
            self.entries[job.key]["finished"] = time.time()

    def run(self) -> None:
        display = LiveStatus()
        try:
            while self.pending or self.running:
                changed = False
                for job, index in list(self.pending):
                    if self.ready(job, index) and self.fits(job):
                        self.pending.remove((job, index))
                        self.start(job, index)
                        changed = True
                for item in list(self.running):
                    if item[2].done():  # a debug job runs here, inside done()
                        self.running.remove(item)
                        self.finish(*item)
                        changed = True
                if not (changed or self.running):
                    waiting = ", ".join(sorted({job.key for job, _ in self.pending}))
                    raise LaunchError(f"{waiting}: waiting for jobs that can never finish (a dependency cycle)")
                if changed:
                    self.save()
                display.update([e for e in self.record["jobs"] if e.get("started")])
                if not changed:
                    time.sleep(1)
        except (Interrupted, KeyboardInterrupt):  # the runner is stopping: its jobs must not run on, unseen
            for _, _, sub in self.running:
                stop_job(sub)
            self.save()
            raise
        finally:
            display.close()


def stop_job(sub: Any) -> None:
    """End a local job as SLURM would (SIGTERM: the job says so in one line and a rerun resumes). submitit's own
    cancel sends SIGINT, which a job still starting Python turns into a KeyboardInterrupt traceback."""
    process = getattr(sub, "_process", None)  # submitit.local.LocalJob's Popen; a debug job has none
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
    elif process is None:
        sub.cancel(check=False)
