"""The callables submitit runs on the cluster. Small and picklable: `TrainTask` maps submitit's JobEnvironment onto
RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and calls `engine.run`, which knows nothing of SLURM. Its
`checkpoint()` only resubmits itself: the engine resumes from its latest complete checkpoint (run.resume=auto), so on
timeout or preemption only the work since that checkpoint is repeated. `EvaluateTask` scores every run and writes
the report."""

from __future__ import annotations

import os
import signal
import threading
import zlib
from pathlib import Path
from typing import Any

from hpcdistill.config import load_config


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


class Resubmitting:
    """A submitted callable: `run()` is its work. On timeout or preemption submitit calls `checkpoint()`, which
    resubmits the same callable; each task's work resumes from what it saved (checkpoints, journals) or, when it is
    idempotent, is redone whole. Requeues are bounded by the executor's max_num_timeout (`max_requeue`)."""

    def run(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> Any:
        result = self.run()
        ignore_requeue_signal()
        return result

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class TrainTask(Resubmitting):
    """`engine.run(load_config(config, overrides))` with rank/world/master from submitit's JobEnvironment."""

    def __init__(self, config_path: str, overrides: list[str], cpus_per_task: int = 1) -> None:
        self.config_path = config_path
        self.overrides = list(overrides)
        self.cpus_per_task = cpus_per_task

    def run(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        single_node = env.num_nodes == 1
        os.environ.update(
            RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
            MASTER_ADDR="127.0.0.1" if single_node else env.hostnames[0], MASTER_PORT=str(master_port(env.raw_job_id)),
        )
        os.environ.setdefault("OMP_NUM_THREADS", str(self.cpus_per_task))
        from hpcdistill import engine  # lazy: the launcher process never imports torch/deepspeed
        from hpcdistill.run_folder import complete_checkpoints

        cfg = load_config(self.config_path, self.overrides)
        found = complete_checkpoints(cfg.run_dir / "checkpoints")
        start = f"resuming from {found[-1]}" if found and cfg.run.resume == "auto" else "starting fresh"
        print(f"hpcdistill launch: {cfg.run_dir} rank {env.global_rank}/{env.num_tasks} on {env.hostname}: {start}",
              flush=True)
        return engine.run(cfg)


class EvaluateTask(Resubmitting):
    """Evaluate every trained run's best.pt, then write the report from all evaluation records."""

    def __init__(self, runs: list[dict[str, Any]], shards: str, split: str, iterations: int, report_dir: str,
                 workers: int = 0) -> None:
        self.runs = runs  # {"run_dir", "method", "study"}
        self.shards = shards
        self.split = split
        self.iterations = iterations
        self.report_dir = report_dir
        self.workers = workers

    def run(self) -> dict[str, Any]:
        from hpcdistill.evaluation import evaluate_checkpoint
        from hpcdistill.report import load_results, write_report

        for run in self.runs:
            evaluate_checkpoint(Path(run["run_dir"]) / "best.pt", self.shards, self.split, method=run["method"],
                                study=run["study"], iterations=self.iterations, workers=self.workers)
        run_dirs = [run["run_dir"] for run in self.runs]
        report = write_report(load_results(run_dirs), self.report_dir)  # idempotent: a requeue redoes it whole
        return {"report": str(report), "evaluated": run_dirs}
