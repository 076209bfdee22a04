"""The job graph of an experiment, as plain data before anything is submitted: teacher -> one array per method over
the magnifications -> evaluate + report, each job's dependencies, resources and submitted callables, and the sbatch
options they become.

Dependencies: each distillation array waits `afterok` on the teacher (a baseline, which never reads the teacher,
starts at once); a method with `init_from` (finetune) waits `aftercorr` on that array instead, so the 2.5x finetune
starts as soon as the 2.5x distillation is done. Evaluation waits `afterok` on every job. `--kill-on-invalid-dep=yes`
makes SLURM cancel the dependants of a failed job instead of leaving them pending for ever. One task per GPU
(tasks_per_node = gpus_per_node); CPU-only clusters give `tasks_per_node` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from hpcdistill.config import load_config
from hpcdistill.ds_config import read_ds_json
from hpcdistill.errors import HpcdistillError, LaunchError
from hpcdistill.experiment import Experiment, Resources
from hpcdistill.launch_tasks import EvaluateTask, TrainTask
from hpcdistill.mags import mag_name


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
    callables: list[Any] = field(default_factory=list, repr=False)  # what each task runs (submitit pickles them)

    @property
    def is_array(self) -> bool:
        return self.kind in ARRAY_KINDS or len(self.tasks) > 1  # a teacher per seed is an array too


def _suffix(seed: int | None) -> str:
    """A seed enters the run name (`kd-2.5x-s1`); without `seeds:` names stay as they were."""
    return "" if seed is None else f"-s{seed}"


def _teacher_job(exp: Experiment, common: list[str]) -> JobPlan:
    tasks = []
    for seed in exp.seeds or [None]:
        name = f"teacher{_suffix(seed)}"
        seeded = [] if seed is None else [f"run.seed={seed}"]
        task = TaskPlan(name, None, str(exp.exp_dir / name), exp.teacher.config,
                        [*exp.teacher.overrides, *common, f"run.name={name}", *seeded])
        _validate(task, "teacher")
        tasks.append(task)
    return JobPlan("teacher", "teacher", exp.resources_for("teacher"), tasks, label="Teacher")


def _method_job(exp: Experiment, name: str, common: list[str]) -> JobPlan:
    """One array per method: a task per (magnification, seed); a distillation task reads its seed's teacher."""
    method, tasks, distills = exp.methods[name], [], False
    for mag in exp.mags:
        for seed in exp.seeds or [None]:
            run_name = f"{name}-{mag_name(mag)}{_suffix(seed)}"
            teacher_best = f"teacher.checkpoint={exp.exp_dir / f'teacher{_suffix(seed)}' / 'best.pt'}"
            extra = [*common, f"run.name={run_name}", f"data.mag={mag:g}", teacher_best]
            extra += [] if seed is None else [f"run.seed={seed}"]
            if method.init_from:
                extra.append(f"model.init={exp.exp_dir / f'{method.init_from}-{mag_name(mag)}{_suffix(seed)}' / 'best.pt'}")
            task = TaskPlan(run_name, mag, str(exp.exp_dir / run_name), method.config, [*method.overrides, *extra])
            distills = _validate(task, f"methods.{name}") == "distill"
            if not distills:
                task.overrides.remove(teacher_best)
            tasks.append(task)
    # Only distillation reads the teacher; a baseline need not queue behind it.
    job = JobPlan(name, "method", exp.resources_for(name), tasks, after_ok=["teacher"] if distills else [],
                  label=method.label, study=method.study)
    job.after_corr = [method.init_from] if method.init_from else []
    return job


def plan_jobs(exp: Experiment) -> list[JobPlan]:
    """The graph in submission order: [shard, merge,] teacher, methods (those with init_from after their source),
    evaluate. Every task's training config is loaded and validated here, so a bad override fails before anything
    is queued."""
    common = [f"run.out_dir={exp.exp_dir}", f"data.shards={exp.shards}"]
    jobs = [_teacher_job(exp, common)]
    for name in sorted(exp.methods, key=lambda n: bool(exp.methods[n].init_from)):  # stable: sources first
        jobs.append(_method_job(exp, name, common))
    if exp.evaluate.enabled:
        res = exp.resources_for("evaluate")  # one process: evaluation is not distributed
        res = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=min(res.gpus_per_node, 1))
        jobs.append(JobPlan("evaluate", "evaluate", res,
                            [TaskPlan("evaluate", None, str(exp.exp_dir / "report"), "", [])],
                            after_ok=[j.key for j in jobs]))
    for job in jobs:
        job.callables = callables_for(job, exp, jobs)
    data_jobs = experiment_shard_jobs(exp, jobs[0].tasks[0])
    for job in jobs if data_jobs else []:
        job.after_ok = ["merge", *job.after_ok]  # everything reads the shards
    return data_jobs + jobs


def experiment_shard_jobs(exp: Experiment, teacher: TaskPlan) -> list[JobPlan]:
    """The experiment's `shard:` stage as an array and its merge ([] without one, or once the shards are complete):
    every magnification the runs need must be cut."""
    if exp.shard is None:
        return []
    from hpcdistill.shard_plan import ShardParams
    from hpcdistill.shard_tasks import plan_array

    stage = exp.shard
    teacher_mag = load_config(teacher.config, teacher.overrides).data.teacher_mag
    mags = tuple(stage.mags) or tuple(sorted({teacher_mag, *exp.mags}, reverse=True))
    missing = sorted({teacher_mag, *exp.mags} - set(mags), reverse=True)
    if missing:
        raise LaunchError(f"shard.mags: {', '.join(map(mag_name, missing))} needed by the runs but not cut")
    try:
        params = ShardParams(mags=mags, max_size=stage.max_size, seed=stage.seed, classes=tuple(stage.classes) or None)
        plan = plan_array(stage.slides, exp.shards, labels_csv=stage.labels or None, params=params, tasks=stage.tasks)
    except HpcdistillError as err:
        raise LaunchError(f"shard: {err}") from None
    return shard_jobs(plan, exp.resources_for("shard"), stage.workers, stage.strict)


def shard_jobs(plan: Any, resources: Resources, workers: int, strict: bool) -> list[JobPlan]:
    """A sharding run's array over its unfinished tasks and the merge after it; [] when the folder is complete."""
    from hpcdistill.shard_tasks import MergeTask, ShardTask, task_dir, task_name

    if plan.complete():
        return []
    todo = plan.unfinished()
    one = dataclasses.replace(resources, nodes=1, tasks_per_node=1, gpus_per_node=0)
    tasks = [TaskPlan(f"shard-{task_name(i)}", None, str(task_dir(plan.out, i)), "", []) for i in todo]
    jobs = [JobPlan("shard", "shard", one, tasks, label="Shard", callables=[ShardTask(plan.share(i), workers) for i in todo])]
    merge = JobPlan("merge", "merge", dataclasses.replace(one, cpus_per_task=1),
                    [TaskPlan("merge", None, plan.out, "", [])], after_ok=["shard"] if todo else [], label="Merge",
                    callables=[MergeTask(plan, strict)])
    return (jobs if todo else []) + [merge]


def _validate(task: TaskPlan, key: str) -> str:
    """Load the task's training config as the job will, and its DeepSpeed JSON; returns its train.mode."""
    try:
        cfg = load_config(task.config, task.overrides)
        read_ds_json(cfg.deepspeed)  # a JSON setting a key the config owns fails here, not on the cluster
        return cfg.train.mode
    except HpcdistillError as err:
        raise LaunchError(f"{key} ({task.name}): {err}") from None


def callables_for(job: JobPlan, exp: Experiment, jobs: list[JobPlan]) -> list[Any]:
    if job.kind == "evaluate":
        runs = [{"run_dir": t.run_dir, "method": j.label, "study": j.study} for j in jobs if j.kind != "evaluate"
                for t in j.tasks]
        return [EvaluateTask(runs, exp.shards, exp.evaluate.split, exp.evaluate.iterations, job.tasks[0].run_dir,
                             workers=job.resources.cpus_per_task - 1)]  # the job's other CPUs decode shards
    return [TrainTask(t.config, t.overrides, job.resources.cpus_per_task) for t in job.tasks]


def dependency_string(job: JobPlan, ids: dict[str, str]) -> str | None:
    """SLURM --dependency value, e.g. 'afterok:12,aftercorr:13' (all must hold)."""
    corr = "aftercorr" if len(job.tasks) > 1 else "afterok"  # one magnification: no array, plain afterok
    parts = [f"afterok:{ids[k]}" for k in job.after_ok] + [f"{corr}:{ids[k]}" for k in job.after_corr]
    return ",".join(parts) or None


def slurm_parameters(job: JobPlan, name: str, dependency: str | None) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keywords (sbatch names) for one job."""
    r = job.resources
    params: dict[str, Any] = {
        "job_name": f"{name}-{job.key}", "time": r.timeout_min, "nodes": r.nodes, "ntasks_per_node": r.tasks,
        "cpus_per_task": r.cpus_per_task, "mem": f"{int(r.mem_gb)}GB" if r.mem_gb == int(r.mem_gb)
        else f"{int(r.mem_gb * 1024)}MB", "signal_delay_s": r.signal_delay_s,
        "additional_parameters": {"kill-on-invalid-dep": "yes", **r.sbatch},
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


def predict_jobs(plan: Any, resources: Resources) -> list[JobPlan]:
    """A prediction run's array over its unfinished tasks and the merge after it."""
    from hpcdistill.predict_tasks import MergePredictionsTask, PredictTask
    from hpcdistill.shard_tasks import task_dir, task_name

    todo = [i for i in range(plan.tasks) if plan.finished(i) is None]
    one = dataclasses.replace(resources, nodes=1, tasks_per_node=1)
    tasks = [TaskPlan(f"predict-{task_name(i)}", None, str(task_dir(plan.out, i)), "", []) for i in todo]
    jobs = [JobPlan("predict", "predict", one, tasks, label="Predict", callables=[PredictTask(plan.share(i)) for i in todo])]
    merge = JobPlan("merge", "merge", dataclasses.replace(one, cpus_per_task=1, gpus_per_node=0),
                    [TaskPlan("merge", None, plan.out, "", [])], after_ok=["predict"] if todo else [], label="Merge",
                    callables=[MergePredictionsTask(plan)])
    return (jobs if todo else []) + [merge]
