"""A job graph as plain data, before anything is submitted: each job's tasks, resources, dependencies and the
callables it runs, and the sbatch options they become. Experiments, sharding arrays and prediction arrays all build
one; `cluster.submit` submits or runs it.

`--kill-on-invalid-dep=yes` makes SLURM cancel the dependants of a failed job instead of leaving them pending for
ever. One task per GPU (tasks_per_node = gpus_per_node); CPU-only clusters give `tasks_per_node` instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hpcdistill.common.errors import ConfigError


@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int = 0  # 0 = one task per GPU (gpus_per_node), or 1 without GPUs
    cpus_per_task: int = 8
    mem_gb: float = 64.0  # per node
    timeout_min: int = 720
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_requeue: int = 3  # timeouts/preemptions after which a job is not requeued again
    signal_delay_s: int = 120  # SLURM signals the job this long before its time limit, to requeue it
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda"
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    # The job's Python: a path, or a shell command that runs one, e.g. "apptainer exec --nv image.sif python" or
    # "conda run --no-capture-output -n hpcdistill python" (the image or environment holds hpcdistill and shares the
    # experiment's filesystem); None: the interpreter that launches.
    python: str | None = None

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


RESOURCE_MAXIMA = {
    "nodes": 10_000,
    "gpus_per_node": 64,
    "tasks_per_node": 1024,
    "cpus_per_task": 1024,
    "mem_gb": 65_536,
    "timeout_min": 366 * 24 * 60,
    "max_requeue": 1000,
    "signal_delay_s": 86_400,
}


def check_resources(res: Resources, prefix: str) -> None:
    for key in ("nodes", "cpus_per_task", "timeout_min"):
        if getattr(res, key) < 1:
            raise ConfigError(f"{prefix}{key}: must be >= 1, got {getattr(res, key)}")
    for key in ("gpus_per_node", "tasks_per_node", "max_requeue", "signal_delay_s"):
        if getattr(res, key) < 0:
            raise ConfigError(f"{prefix}{key}: must be >= 0, got {getattr(res, key)}")
    if not res.mem_gb > 0:
        raise ConfigError(f"{prefix}mem_gb: must be > 0, got {res.mem_gb}")
    for key, most in RESOURCE_MAXIMA.items():  # past these a value is a typo, and sbatch's refusal comes too late
        if getattr(res, key) > most:
            raise ConfigError(f"{prefix}{key}: must be <= {most:g}, got {getattr(res, key):g}")
    if res.gpus_per_node and res.tasks_per_node and res.tasks_per_node != res.gpus_per_node:
        raise ConfigError(
            f"{prefix}tasks_per_node: {res.tasks_per_node} != gpus_per_node {res.gpus_per_node}; "
            "one task per GPU (leave tasks_per_node out)"
        )
    if res.timeout_min * 60 <= res.signal_delay_s:
        raise ConfigError(
            f"{prefix}timeout_min: {res.timeout_min} min must exceed signal_delay_s "
            f"({res.signal_delay_s} s), or a job is signalled to requeue as soon as it starts"
        )


@dataclass
class TaskPlan:
    name: str  # the run name, e.g. "kd-2.5x"
    mag: float | None
    run_dir: str
    config: str
    overrides: list[str]


ARRAY_KINDS = ("method", "shard", "predict")  # one task per magnification, per slice of the slides


@dataclass
class JobPlan:
    key: str  # "teacher", a method name, "evaluate", "shard", "merge", "predict"
    kind: Literal["teacher", "method", "evaluate", "shard", "merge", "predict"]
    resources: Resources
    tasks: list[TaskPlan]
    after_ok: list[str] = field(default_factory=list)  # job keys this job waits for (all tasks)
    after_corr: list[str] = field(default_factory=list)  # array keys whose task i this job's task i waits for
    label: str = ""
    study: str = "main"
    gate: str = ""  # what must hold before its tasks may start, beyond the dependencies (the teacher gate)
    callables: list[Any] = field(default_factory=list, repr=False)  # what each task runs (submitit pickles them)

    @property
    def is_array(self) -> bool:
        return self.kind in ARRAY_KINDS or len(self.tasks) > 1  # a teacher per seed is an array too


def dependency_string(job: JobPlan, ids: dict[str, str]) -> str | None:
    """SLURM --dependency value, e.g. 'afterok:12,aftercorr:13' (all must hold)."""
    corr = "aftercorr" if len(job.tasks) > 1 else "afterok"  # one magnification: no array, plain afterok
    parts = [f"afterok:{ids[k]}" for k in job.after_ok] + [f"{corr}:{ids[k]}" for k in job.after_corr]
    return ",".join(parts) or None


def slurm_parameters(job: JobPlan, name: str, dependency: str | None) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keywords (sbatch names) for one job."""
    r = job.resources
    params: dict[str, Any] = {
        "job_name": f"{name}-{job.key}",
        "time": r.timeout_min,
        "nodes": r.nodes,
        "ntasks_per_node": r.tasks,
        "cpus_per_task": r.cpus_per_task,
        "mem": f"{int(r.mem_gb)}GB" if r.mem_gb == int(r.mem_gb) else f"{int(r.mem_gb * 1024)}MB",
        "signal_delay_s": r.signal_delay_s,
        # --requeue: the tasks requeue themselves on a time limit or preemption (submitit's scontrol requeue), which a
        # site with JobRequeue=0 refuses for jobs that did not ask (slurm/README.md); sbatch: {requeue: false} drops it
        "additional_parameters": {
            "kill-on-invalid-dep": "yes",
            **({"requeue": True} if r.max_requeue else {}),
            **r.sbatch,
        },
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.nodes * r.tasks > 1:  # data-parallel ranks wait on each other: one that dies must end the job, not leave the
        params["srun_args"] = ["--kill-on-bad-exit=1"]  # others blocked in a collective until the NCCL timeout
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(r, key):
            params[key] = getattr(r, key)
    if r.setup:
        params["setup"] = list(r.setup)
    if dependency:
        params["dependency"] = dependency
    return params
