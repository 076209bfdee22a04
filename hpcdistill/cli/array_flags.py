"""The flags that send `shard` and `predict` to an array of tasks (`--cluster`, `--tasks`, the SLURM resources),
and running such an array through the launcher, shared by both subcommands."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import Resources

CLUSTERS = ["debug", "local", "slurm"]  # what --cluster means in every subcommand that has it


def add_cluster_flags(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(f"as an array of tasks ({what} over SLURM or local processes)")
    defaults = Resources()
    group.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="split the slides over --tasks array tasks: a SLURM array through submitit, local processes, or "
        "debug (each task in turn in this process); then merge (default: this process alone)",
    )
    group.add_argument("--tasks", type=int, default=1, help="array tasks (slides balanced across them)")
    group.add_argument("--wait", action="store_true", help="slurm: wait until the merge job has finished")
    group.add_argument("--partition", help="SLURM partition")
    group.add_argument("--account", help="SLURM account")
    group.add_argument("--qos", help="SLURM quality of service")
    group.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: --workers, or 1)")
    group.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per array task (predict on GPU nodes)")
    group.add_argument("--mem-gb", type=float, default=16.0, help="memory per array task")
    group.add_argument("--timeout-min", type=int, default=defaults.timeout_min, help="time limit per array task")
    group.add_argument(
        "--max-requeue",
        type=int,
        default=defaults.max_requeue,
        help="requeues after a timeout or preemption (each resumes where the task stopped)",
    )


def cluster_resources(args: argparse.Namespace) -> Resources:
    """One CPU task per array element, from the flags."""
    from hpcdistill.cluster.job_plan import check_resources

    workers = max(1, getattr(args, "workers", 1))
    res = Resources(
        nodes=1,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=1,
        cpus_per_task=args.cpus_per_task or workers,
        mem_gb=args.mem_gb,
        timeout_min=args.timeout_min,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        max_requeue=args.max_requeue,
        signal_delay_s=min(120, args.timeout_min * 60 // 2),
    )
    check_resources(res, "--")
    return res


def run_array(name: str, out: str | Path, jobs: list[Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """Launch `jobs` (an array and its merge) with its record in `out`/launch.json; None after a dry run or a
    submission not waited for, else the launch record."""
    from hpcdistill.cluster.submit import launch_graph

    command = "hpcdistill " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = launch_graph(
        name,
        Path(out),
        jobs,
        args.cluster,
        dry_run=args.dry_run,
        wait=args.wait or args.cluster != "slurm",
        source=command,
    )
    if args.dry_run:
        return None
    if args.cluster == "slurm" and not args.wait:
        ids = ", ".join(f"{job['key']} {job['slurm_id']}" for job in record["jobs"])
        print(f"submitted {ids}; follow it with: hpcdistill status {out}")
        return None
    return record
