"""Job graphs and running them, torch-free: the plain-data plan of jobs and tasks, SLURM submission through submitit or
the local runner, the requeueing task base, arrays of tasks with their merge, launch records, the dry run and
status."""

from __future__ import annotations

from hpcdistill.cluster.dry_run import render_dry_run
from hpcdistill.cluster.job_plan import JobPlan, Resources, TaskPlan
from hpcdistill.cluster.local_runner import LocalRunner
from hpcdistill.cluster.resubmitting import Resubmitting
from hpcdistill.cluster.status import experiment_status, format_status
from hpcdistill.cluster.submit import launch_graph
from hpcdistill.cluster.task_array import array_and_merge, balance

__all__ = [
    "JobPlan",
    "LocalRunner",
    "Resources",
    "Resubmitting",
    "TaskPlan",
    "array_and_merge",
    "balance",
    "experiment_status",
    "format_status",
    "launch_graph",
    "render_dry_run",
]
