"""`hpcdistill launch`: an experiment file's job graph, submitted to SLURM or run on this machine."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from hpcdistill.cluster.submit import Cluster, launch_graph
from hpcdistill.common.folder_lock import one_writer
from hpcdistill.experiment.experiment_file import load_experiment
from hpcdistill.experiment.graph import plan_jobs


def launch(
    experiment_path: str | Path,
    cluster: Cluster = "slurm",
    dry_run: bool = False,
    wait: bool = False,
    wait_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Submit (slurm) or run (local/debug) an experiment; returns the launch record (also <exp dir>/launch.json).

    slurm: everything is submitted at once with dependencies; `wait=True` then waits for every job's result.
    local/debug: this process schedules the tasks by their dependencies on the machine's cores (local_runner).
    dry_run: print the sbatch scripts and the dependency graph; nothing is submitted or written.
    """
    exp = load_experiment(experiment_path)
    jobs = plan_jobs(exp)
    # held while this process submits or runs the jobs (local/debug): `status` tells a live local runner from a dead one
    with contextlib.nullcontext() if dry_run else one_writer(exp.exp_dir):
        return launch_graph(
            exp.name,
            exp.exp_dir,
            jobs,
            cluster,
            dry_run=dry_run,
            wait=wait,
            wait_timeout_s=wait_timeout_s,
            source=exp.path,
        )
