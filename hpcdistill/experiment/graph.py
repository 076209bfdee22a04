"""The job graph of an experiment (cluster.job_plan's plain data): [shard -> merge ->] teacher -> one array per
method over the magnifications -> evaluate + report.

Dependencies: each distillation array waits `afterok` on the teacher (a baseline, which never reads the teacher,
starts at once); a method with `init_from` (finetune) waits `aftercorr` on that array instead, so the 2.5x finetune
starts as soon as the 2.5x distillation is done. Evaluation waits `afterok` on every job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hpcdistill.cluster.job_plan import JobPlan, TaskPlan
from hpcdistill.common.errors import HpcdistillError, LaunchError
from hpcdistill.common.mags import mag_name
from hpcdistill.config.loading import load_config
from hpcdistill.config.schema import Config
from hpcdistill.evaluate.options import EvalOptions
from hpcdistill.evaluate.task import EvaluateTask
from hpcdistill.experiment.experiment_file import Experiment
from hpcdistill.shards.array import plan_array, shard_jobs
from hpcdistill.shards.plan import ShardParams
from hpcdistill.train.ds_config import read_ds_json
from hpcdistill.train.task import TrainTask


def _suffix(seed: int | None) -> str:
    """A seed enters the run name (`kd-2.5x-s1`); without `seeds:` names stay as they were."""
    return "" if seed is None else f"-s{seed}"


def _teacher_job(exp: Experiment, common: list[str]) -> JobPlan:
    tasks = []
    for seed in exp.seeds or [None]:
        name = f"teacher{_suffix(seed)}"
        seeded = [] if seed is None else [f"run.seed={seed}"]
        task = TaskPlan(
            name,
            None,
            str(exp.exp_dir / name),
            exp.teacher.config,
            [*exp.teacher.overrides, *common, f"run.name={name}", *seeded],
        )
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
                extra.append(f"model.init={_best(exp, method.init_from, mag, seed)}")
            if method.gate_against:
                extra.append(f"teacher.reference={_best(exp, method.gate_against, mag, seed)}")
            task = TaskPlan(run_name, mag, str(exp.exp_dir / run_name), method.config, [*method.overrides, *extra])
            cfg = _validate(task, f"methods.{name}")
            distills = cfg.train.mode == "distill"
            if not distills:
                task.overrides.remove(teacher_best)
            tasks.append(task)
    # Only distillation reads the teacher; a baseline need not queue behind it.
    job = JobPlan(
        name,
        "method",
        exp.resources_for(name),
        tasks,
        after_ok=(["teacher"] + ([method.gate_against] if method.gate_against else [])) if distills else [],
        label=method.label,
        study=method.study,
        gate=_gate_text(cfg, method.gate_against) if distills else "",
    )
    job.after_corr = [method.init_from] if method.init_from else []
    return job


def plan_jobs(exp: Experiment) -> list[JobPlan]:
    """The graph in submission order: [shard, merge,] teacher, methods (those with init_from after their source),
    evaluate. Every task's training config is loaded and validated here, so a bad override fails before anything
    is queued."""
    common = [f"run.out_dir={exp.exp_dir}", f"data.shards={exp.shards}"]
    jobs = [_teacher_job(exp, common)]
    waits = {n: bool(m.init_from or m.gate_against) for n, m in exp.methods.items()}
    for name in sorted(exp.methods, key=waits.__getitem__):  # stable: the methods others wait on first
        jobs.append(_method_job(exp, name, common))
    if exp.evaluate.enabled:
        res = exp.resources_for("evaluate")  # one process: evaluation is not distributed
        res = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=min(res.gpus_per_node, 1))
        jobs.append(
            JobPlan(
                "evaluate",
                "evaluate",
                res,
                [TaskPlan("evaluate", None, str(exp.exp_dir / "report"), "", [])],
                after_ok=[j.key for j in jobs],
            )
        )
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


def _best(exp: Experiment, method: str, mag: float, seed: int | None) -> Path:
    """Another method's export at this magnification and seed."""
    return exp.exp_dir / f"{method}-{mag_name(mag)}{_suffix(seed)}" / "best.pt"


def _gate_text(cfg: Config, against: str) -> str:
    """The teacher gate a distillation array passes, as the graph shows it."""
    gate = cfg.teacher
    text = f"teacher val accuracy >= {gate.min_val_accuracy:g}" + (f" and > {against}'s" if against else "")
    return f"{text} ({gate.gate})"


def _validate(task: TaskPlan, key: str) -> Config:
    """Load the task's training config as the job will, and its DeepSpeed JSON."""
    try:
        cfg = load_config(task.config, task.overrides)
        read_ds_json(cfg.deepspeed)  # a JSON setting a key the config owns fails here, not on the cluster
        return cfg
    except HpcdistillError as err:
        raise LaunchError(f"{key} ({task.name}): {err}") from None


def callables_for(job: JobPlan, exp: Experiment, jobs: list[JobPlan]) -> list[Any]:
    if job.kind == "evaluate":
        runs = [
            {"run_dir": t.run_dir, "method": j.label, "study": j.study}
            for j in jobs
            if j.kind != "evaluate"
            for t in j.tasks
        ]
        return [
            EvaluateTask(
                runs,
                exp.shards,
                EvalOptions(
                    split=exp.evaluate.split,
                    iterations=exp.evaluate.iterations,
                    workers=job.resources.cpus_per_task - 1,
                    units=tuple(exp.evaluate.units),
                    slide_rule=exp.evaluate.slide_rule,
                ),
                job.tasks[0].run_dir,
            )
        ]  # the job's other CPUs decode shards
    return [TrainTask(t.config, t.overrides, job.resources.cpus_per_task) for t in job.tasks]
