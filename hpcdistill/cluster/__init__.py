"""Job graphs and running them, torch-free: the plain-data plan of jobs and tasks, SLURM submission through submitit or
the local runner, the requeueing task base, arrays of tasks with their merge, launch records, the dry run and
status."""

from hpcdistill.common.lazy_exports import lazy_exports

_EXPORTS = {
    "JobPlan": "job_plan",
    "TaskPlan": "job_plan",
    "Resources": "job_plan",
    "launch_graph": "submit",
    "Resubmitting": "resubmitting",
    "array_and_merge": "task_array",
    "balance": "task_array",
    "status": "status",
    "format_status": "status",
    "LocalRunner": "local_runner",
    "render_dry_run": "dry_run",
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
