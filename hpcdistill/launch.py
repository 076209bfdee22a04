"""One experiment file -> a graph of SLURM jobs through submitit: teacher -> one array per method -> evaluate + report.

Shape chosen (and why):
- The experiment YAML is parsed into dataclasses with config.py's own builder, so a typo is the same one-line
  "key: unknown key (did you mean ...?)" error as in training configs. Paths in it (configs, shards, out_dir) resolve
  against the working directory, then the experiment file's folder, then the repository; they are made absolute at
  launch so jobs do not depend on where SLURM starts them.
- The graph is built first as plain data (`plan_jobs`), then rendered (`--dry-run`), submitted to SLURM with
  dependencies, or run stage by stage on the local/debug executors (they have no dependencies). Every run directory,
  log and TensorBoard folder is known before anything is submitted and is written to `<exp dir>/launch.json`.
- Dependencies: each distillation array waits `afterok` on the teacher (a baseline, which never reads the teacher,
  starts at once); a method with `init_from` (finetune) waits `aftercorr` on that array instead, so the 2.5x
  finetune starts as soon as the 2.5x distillation is done (not when all magnifications are). Evaluation waits
  `afterok` on every job. `--kill-on-invalid-dep=yes` makes SLURM cancel the dependants of a failed job instead of
  leaving them pending for ever (so `wait=True` and `status` see CANCELLED, never a hang).
- The submitted callables (`TrainTask`, `EvaluateTask`) are small picklable classes. `TrainTask` maps submitit's
  JobEnvironment onto RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and calls `engine.run`, which knows nothing
  of SLURM. Its `checkpoint()` only resubmits itself: the engine resumes from its latest complete checkpoint
  (run.resume=auto), so on timeout/preemption the work since that checkpoint is the only work repeated.
  Requeues are bounded by `max_requeue` (submitit's max_num_timeout).
- One task per GPU (tasks_per_node = gpus_per_node); CPU-only clusters give `tasks_per_node` instead.
- Time limits: `timeout_min * 60` must exceed `signal_delay_s`, checked at load. slurmctld checks limits every
  30 s and may signal up to one check early, so on short limits the signal comes 0-30 s before `signal_delay_s`.
- `--dry-run` renders each script with submitit's own (private) `_make_sbatch_string`, falling back to a plain
  rendering of the same options if that function changes. Job ids are shown as <job key>.
- `status` reads `<exp dir>/launch.json`; states come from sacct on SLURM (array tasks as `<id>_<i>`) and from
  submitit's result files otherwise.
- Each launch gets a fresh submitit folder `<exp dir>/slurm/<stamp>/`, logs at `<stamp>/%A_%a/` (arrays) or
  `<stamp>/%j/`: SLURM job ids restart when a (test) cluster is reset, and a reused folder would return stale results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from hpcdistill.config import ConfigError, build_dataclass, load_config, merge_dicts, read_yaml
from hpcdistill.errors import HpcdistillError
from hpcdistill.mags import mag_name, parse_mag
from hpcdistill.progress import LiveStatus, describe, read_progress

REPO_ROOT = Path(__file__).resolve().parents[1]
Cluster = Literal["slurm", "local", "debug"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class LaunchError(HpcdistillError):
    """A bad experiment file, a failed submission or a failed job."""


# ---------------------------------------------------------------------------------------------- experiment file


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

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


@dataclass
class JobSpec:
    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class MethodSpec:
    config: str = ""
    label: str = ""  # the method name in the report ("Baseline", "KD", "KD (ADv1)"); default: the method key
    overrides: list[str] = field(default_factory=list)
    init_from: str = ""  # another method whose best.pt at the same magnification initialises this one (finetune)
    study: Literal["main", "ablation"] = "main"


@dataclass
class EvaluateSpec:
    enabled: bool = True
    split: str = "test"
    iterations: int = 10000


@dataclass
class Experiment:
    name: str = ""
    out_dir: str = "runs"
    shards: str = ""
    mags: list[float] = field(default_factory=list)
    teacher: JobSpec = field(default_factory=JobSpec)
    methods: dict[str, MethodSpec] = field(default_factory=dict)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    resources: dict[str, Resources] = field(default_factory=dict)  # "default", "teacher", <method>, "evaluate"
    path: str = ""  # the experiment file (set by the loader)

    @property
    def exp_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def resources_for(self, kind: str) -> Resources:
        return self.resources.get(kind) or self.resources["default"]


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML (it may inherit another by `base:`); errors are one line: file and key."""
    path = Path(path)
    try:
        raw = read_yaml(path, ())  # config.py's reader: safe_load, one-line errors, `base:` inheritance
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    try:
        return _experiment_from_dict(raw, path)
    except ConfigError as err:
        raise LaunchError(f"{path}: {err}") from None


def _experiment_from_dict(raw: dict[str, Any], path: Path) -> Experiment:
    raw = dict(raw)
    methods_raw = raw.pop("methods", None)
    resources_raw = raw.pop("resources", None) or {}
    mags_raw = raw.pop("mags", None)
    if "path" in raw:
        raise ConfigError("path: unknown key")
    exp: Experiment = build_dataclass(Experiment, raw, "")  # scalar fields, teacher, evaluate
    for key in ("name", "shards"):
        if not getattr(exp, key):
            raise ConfigError(f"{key}: required")
    if not exp.teacher.config:
        raise ConfigError("teacher.config: required (the teacher's training config)")
    if not isinstance(mags_raw, list) or not mags_raw:
        raise ConfigError("mags: required, a list of magnifications like [5, 2.5]")
    try:
        exp.mags = [parse_mag(m) for m in mags_raw]
    except HpcdistillError as err:
        raise ConfigError(f"mags: {err}") from None
    if len(set(exp.mags)) != len(exp.mags):
        raise ConfigError(f"mags: repeated magnification in {mags_raw}")
    methods_raw = {} if methods_raw is None else methods_raw  # a teacher-only experiment is allowed
    if not isinstance(methods_raw, dict):
        raise ConfigError("methods: expected a mapping like {baseline: {config: ..., label: Baseline}}")
    for name, spec in methods_raw.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"methods.{name}: method names are letters, digits, '_' or '-'")
        if name in ("teacher", "evaluate", "default"):
            raise ConfigError(f"methods.{name}: reserved name (used for job kinds)")
        method: MethodSpec = build_dataclass(MethodSpec, spec, f"methods.{name}.")
        if not method.config:
            raise ConfigError(f"methods.{name}.config: required")
        method.label = method.label or name
        exp.methods[name] = method
    for name, method in exp.methods.items():
        if method.init_from and method.init_from not in exp.methods:
            raise ConfigError(f"methods.{name}.init_from: {method.init_from!r} is not a method "
                              f"(have {', '.join(exp.methods)})")
        if method.init_from == name:
            raise ConfigError(f"methods.{name}.init_from: a method cannot start from itself")
        if method.init_from and exp.methods[method.init_from].init_from:
            raise ConfigError(f"methods.{name}.init_from: {method.init_from} itself has init_from; one level only")
    exp.resources = _parse_resources(resources_raw, list(exp.methods))
    if exp.evaluate.iterations < 1:
        raise ConfigError(f"evaluate.iterations: must be >= 1, got {exp.evaluate.iterations}")
    base = path.parent
    exp.path = str(path.resolve())
    exp.out_dir = str(_locate(exp.out_dir, base, must_exist=False))
    exp.shards = str(_locate(exp.shards, base, must_exist=False))
    exp.teacher.config = str(_locate(exp.teacher.config, base, key="teacher.config"))
    for name, method in exp.methods.items():
        method.config = str(_locate(method.config, base, key=f"methods.{name}.config"))
    return exp


def _parse_resources(raw: Any, methods: list[str]) -> dict[str, Resources]:
    if not isinstance(raw, dict):
        raise ConfigError(f"resources: expected a mapping of job kinds, got {raw!r}")
    kinds = ["default", "teacher", "evaluate", *methods]
    default_raw = raw.get("default") or {}
    out: dict[str, Resources] = {}
    for kind, part in raw.items():
        if kind not in kinds:
            raise ConfigError(f"resources.{kind}: unknown job kind (known: {', '.join(kinds)})")
        if part is not None and not isinstance(part, dict):
            raise ConfigError(f"resources.{kind}: expected a mapping, got {part!r}")
    for kind in kinds:
        if kind != "default" and kind not in raw:
            continue
        merged = merge_dicts(default_raw, raw.get(kind) or {}) if kind != "default" else dict(default_raw)
        prefix = f"resources.{kind}."
        sbatch = merged.pop("sbatch", None) or {}
        res: Resources = build_dataclass(Resources, merged, prefix)
        if not isinstance(sbatch, dict) or any(isinstance(v, (dict, list)) for v in sbatch.values()):
            raise ConfigError(f"{prefix}sbatch: expected a mapping of sbatch options to values, got {sbatch!r}")
        res.sbatch = dict(sbatch)
        _check_resources(res, prefix)
        out[kind] = res
    return out


def _check_resources(res: Resources, prefix: str) -> None:
    for key in ("nodes", "cpus_per_task", "timeout_min"):
        if getattr(res, key) < 1:
            raise ConfigError(f"{prefix}{key}: must be >= 1, got {getattr(res, key)}")
    for key in ("gpus_per_node", "tasks_per_node", "max_requeue", "signal_delay_s"):
        if getattr(res, key) < 0:
            raise ConfigError(f"{prefix}{key}: must be >= 0, got {getattr(res, key)}")
    if not res.mem_gb > 0:
        raise ConfigError(f"{prefix}mem_gb: must be > 0, got {res.mem_gb}")
    if res.gpus_per_node and res.tasks_per_node and res.tasks_per_node != res.gpus_per_node:
        raise ConfigError(f"{prefix}tasks_per_node: {res.tasks_per_node} != gpus_per_node {res.gpus_per_node}; "
                          "one task per GPU (leave tasks_per_node out)")
    if res.timeout_min * 60 <= res.signal_delay_s:
        raise ConfigError(f"{prefix}timeout_min: {res.timeout_min} min must exceed signal_delay_s "
                          f"({res.signal_delay_s} s), or a job is signalled to requeue as soon as it starts")


def _locate(path: str, base: Path, *, must_exist: bool = True, key: str = "") -> Path:
    """As given (cwd), else next to the experiment file, else in the repository; absolute."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        candidates = [Path.cwd() / p, base / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    if must_exist:
        raise ConfigError(f"{key}: {path}: no such file (looked in {', '.join(str(c.parent) for c in candidates)})")
    return candidates[0].resolve()


# ---------------------------------------------------------------------------------------------- submitted callables


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


class TrainTask:
    """`engine.run(load_config(config, overrides))` with rank/world/master from submitit's JobEnvironment."""

    def __init__(self, config_path: str, overrides: list[str], cpus_per_task: int = 1) -> None:
        self.config_path = config_path
        self.overrides = list(overrides)
        self.cpus_per_task = cpus_per_task

    def __call__(self) -> dict[str, Any]:
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
        result = engine.run(cfg)
        ignore_requeue_signal()
        return result

    def checkpoint(self) -> Any:
        """Called by submitit on timeout/preemption: resubmit as is; the engine resumes from its last checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


class EvaluateTask:
    """Evaluate every trained run's best.pt, then write the report from all evaluation records."""

    def __init__(self, runs: list[dict[str, Any]], shards: str, split: str, iterations: int, report_dir: str,
                 workers: int = 0) -> None:
        self.runs = runs  # {"run_dir", "method", "study"}
        self.shards = shards
        self.split = split
        self.iterations = iterations
        self.report_dir = report_dir
        self.workers = workers

    def __call__(self) -> dict[str, Any]:
        from hpcdistill.evaluation import evaluate_checkpoint
        from hpcdistill.report import load_results, write_report

        for run in self.runs:
            evaluate_checkpoint(Path(run["run_dir"]) / "best.pt", self.shards, self.split, method=run["method"],
                                study=run["study"], iterations=self.iterations, workers=self.workers)
        run_dirs = [run["run_dir"] for run in self.runs]
        report = write_report(load_results(run_dirs), self.report_dir)
        ignore_requeue_signal()
        return {"report": str(report), "evaluated": run_dirs}

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # evaluation is idempotent: rerun it whole


# ---------------------------------------------------------------------------------------------- the job graph


@dataclass
class TaskPlan:
    name: str  # the run name, e.g. "kd-2.5x"
    mag: float | None
    run_dir: str
    config: str
    overrides: list[str]


@dataclass
class JobPlan:
    key: str  # "teacher", a method name, or "evaluate"
    kind: Literal["teacher", "method", "evaluate"]
    resources: Resources
    tasks: list[TaskPlan]
    after_ok: list[str] = field(default_factory=list)  # job keys this job waits for (all tasks)
    after_corr: list[str] = field(default_factory=list)  # array keys whose task i this job's task i waits for
    label: str = ""
    study: str = "main"

    @property
    def is_array(self) -> bool:
        return self.kind == "method"


def plan_jobs(exp: Experiment) -> list[JobPlan]:
    """The graph in submission order: teacher, methods (those with init_from after their source), evaluate.

    Every task's training config is loaded and validated here, so a bad override fails before anything is queued.
    """
    exp_dir = exp.exp_dir
    common = [f"run.out_dir={exp_dir}", f"data.shards={exp.shards}"]
    teacher_task = TaskPlan("teacher", None, str(exp_dir / "teacher"), exp.teacher.config,
                            [*exp.teacher.overrides, *common, "run.name=teacher"])
    _validate(teacher_task, "teacher")
    jobs = [JobPlan("teacher", "teacher", exp.resources_for("teacher"), [teacher_task], label="Teacher")]
    teacher_best = exp_dir / "teacher" / "best.pt"
    needs_teacher: dict[str, bool] = {}
    order = sorted(exp.methods, key=lambda n: bool(exp.methods[n].init_from))  # stable: sources first
    for name in order:
        method = exp.methods[name]
        tasks = []
        for mag in exp.mags:
            run_name = f"{name}-{mag_name(mag)}"
            extra = [*common, f"run.name={run_name}", f"data.mag={mag:g}", f"teacher.checkpoint={teacher_best}"]
            if method.init_from:
                extra.append(f"model.init={exp_dir / f'{method.init_from}-{mag_name(mag)}' / 'best.pt'}")
            task = TaskPlan(run_name, mag, str(exp_dir / run_name), method.config, [*method.overrides, *extra])
            needs_teacher[name] = _validate(task, f"methods.{name}") == "distill"
            if not needs_teacher[name]:
                task.overrides.remove(f"teacher.checkpoint={teacher_best}")
            tasks.append(task)
        # Only distillation reads the teacher; a baseline need not queue behind it.
        job = JobPlan(name, "method", exp.resources_for(name), tasks,
                      after_ok=["teacher"] if needs_teacher[name] else [], label=method.label, study=method.study)
        if method.init_from:
            job.after_corr = [method.init_from]
        jobs.append(job)
    if exp.evaluate.enabled:
        res = exp.resources_for("evaluate")  # one process: evaluation is not distributed
        res = dataclasses.replace(res, nodes=1, tasks_per_node=1, gpus_per_node=min(res.gpus_per_node, 1))
        jobs.append(JobPlan("evaluate", "evaluate", res, [TaskPlan("evaluate", None, str(exp_dir / "report"), "", [])],
                            after_ok=[j.key for j in jobs]))
    return jobs


def _validate(task: TaskPlan, key: str) -> str:
    """Load the task's training config as the job will; returns its train.mode."""
    try:
        return load_config(task.config, task.overrides).train.mode
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


def slurm_parameters(job: JobPlan, exp: Experiment, dependency: str | None) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keywords (sbatch names) for one job."""
    r = job.resources
    params: dict[str, Any] = {
        "job_name": f"{exp.name}-{job.key}", "time": r.timeout_min, "nodes": r.nodes, "ntasks_per_node": r.tasks,
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


# ---------------------------------------------------------------------------------------------- launching


def launch(experiment_path: str | Path, cluster: Cluster = "slurm", dry_run: bool = False, wait: bool = False,
           wait_timeout_s: float | None = None) -> dict[str, Any]:
    """Submit (slurm) or run (local/debug) an experiment; returns the launch record (also <exp dir>/launch.json).

    slurm: everything is submitted at once with dependencies; `wait=True` then waits for every job's result.
    local/debug: this process schedules the tasks by their dependencies on the machine's cores (local_runner).
    dry_run: print the sbatch scripts and the dependency graph; nothing is submitted or written.
    """
    if cluster not in ("slurm", "local", "debug"):
        raise LaunchError(f"cluster: expected slurm, local or debug, got {cluster!r}")
    exp = load_experiment(experiment_path)
    jobs = plan_jobs(exp)
    if dry_run:
        text = render_dry_run(exp, jobs)
        print(text)
        return {"name": exp.name, "exp_dir": str(exp.exp_dir), "dry_run": True, "text": text,
                "graph": {j.key: {"after_ok": j.after_ok, "after_corr": j.after_corr} for j in jobs}}
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    folder = exp.exp_dir / "slurm" / stamp
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"name": exp.name, "experiment": exp.path, "exp_dir": str(exp.exp_dir),
                              "cluster": cluster, "folder": str(folder), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "jobs": []}
    _write_record(exp, folder, record)  # from the start: `hpcdistill status` works while a local launch runs
    try:  # the record is written even when a submission or a job fails: status and scancel need the ids
        if cluster == "slurm":
            submitted = _submit_slurm(exp, jobs, folder, record)
            if wait:
                _write_record(exp, folder, record)
                _wait_all(submitted, record, wait_timeout_s, lambda: _write_record(exp, folder, record))
        else:
            _run_local(exp, jobs, folder, record, cluster)
    finally:
        _write_record(exp, folder, record)
        for literal in folder.glob("%j"):  # submitit makes the id-pattern folder itself; logs go to the real ids
            if literal.is_dir() and not any(literal.iterdir()):
                literal.rmdir()
    return record


def _write_record(exp: Experiment, folder: Path, record: dict[str, Any]) -> None:
    text = json.dumps(record, indent=2, default=str)
    (folder / "launch.json").write_text(text)
    tmp = exp.exp_dir / "launch.json.tmp"
    tmp.write_text(text)
    os.replace(tmp, exp.exp_dir / "launch.json")  # the latest launch; each launch's own copy stays in its folder


def job_record(job: JobPlan) -> dict[str, Any]:
    """A job's entry in launch.json before it is submitted; `record_submission` fills in each task's id and logs."""
    tasks = [{"name": t.name, "mag": t.mag, "run_dir": t.run_dir, "job_id": None, "stdout": None, "stderr": None,
              "tensorboard": None if job.kind == "evaluate" else str(Path(t.run_dir) / "tb"), "state": "PENDING"}
             for t in job.tasks]
    return {"key": job.key, "kind": job.kind, "label": job.label, "array": job.is_array, "slurm_id": None,
            "ntasks": job.resources.nodes * job.resources.tasks, "dependency": None, "after_ok": job.after_ok,
            "after_corr": job.after_corr, "tasks": tasks}


def record_submission(entry: dict[str, Any], index: int, sub: Any) -> None:
    """Task `index` of the job in `entry` was submitted as submitit job `sub`."""
    entry["slurm_id"] = entry["slurm_id"] or str(sub.job_id).split("_")[0]
    entry["tasks"][index].update(job_id=str(sub.job_id), stdout=str(sub.paths.stdout), stderr=str(sub.paths.stderr),
                                 state=None)


def _submit_slurm(exp: Experiment, jobs: list[JobPlan], folder: Path, record: dict[str, Any]) -> list[tuple]:
    import submitit

    ids: dict[str, str] = {}
    submitted = []
    for job in jobs:
        dependency = dependency_string(job, ids)
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=job.resources.max_requeue)
        try:
            ex.update_parameters(**slurm_parameters(job, exp, dependency))
            fns = callables_for(job, exp, jobs)
            out = ex.submit_array(fns) if job.is_array else [ex.submit(fns[0])]
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError, ValueError) as err:
            done = ", ".join(f"{k}={v}" for k, v in ids.items()) or "none"
            raise LaunchError(f"{job.key}: sbatch failed ({' '.join(str(err).split())[:300]}); "
                              f"already submitted: {done}") from None
        ids[job.key] = out[0].job_id.split("_")[0]
        entry = job_record(job)
        entry["dependency"] = dependency
        for index, sub in enumerate(out):
            record_submission(entry, index, sub)
        record["jobs"].append(entry)
        submitted.append((job, out))
    return submitted


def _run_local(exp: Experiment, jobs: list[JobPlan], folder: Path, record: dict[str, Any], cluster: str) -> None:
    from hpcdistill.local_runner import LocalRunner

    callables = {job.key: callables_for(job, exp, jobs) for job in jobs}
    LocalRunner(jobs, callables, folder, cluster, record, lambda: _write_record(exp, folder, record)).run()


def _wait_all(submitted: list[tuple], record: dict[str, Any], timeout_s: float | None,
              on_job_done: Callable[[], None]) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for (job, out), entry in zip(submitted, record["jobs"]):
        _wait_job(job, out, entry, deadline, LiveStatus())
        on_job_done()


def _wait_job(job: JobPlan, out: list[Any], entry: dict[str, Any], deadline: float | None,
              display: LiveStatus) -> None:
    """Wait for every task, showing their progress; store results, states and the job's end time; a failure
    raises one line naming the job and its log."""
    entry.setdefault("started", time.time())
    try:
        for task, sub in zip(entry["tasks"], out):
            polls = 0
            while not sub.done(force_check=polls % 10 == 9):  # sacct at least every 10 s: a killed job writes no result
                polls += 1
                if deadline is not None and time.monotonic() > deadline:
                    raise LaunchError(f"{job.key}: job {sub.job_id} not finished in time (state {sub.state}); "
                                      f"log: {task['stdout']}")
                display.update([entry])
                time.sleep(1)
            try:
                results = sub.results()
            except Exception as err:  # submitit raises FailedJobError / UncompletedJobError with the job's traceback
                task["state"] = "FAILED"
                raise LaunchError(f"{job.key}: job {sub.job_id} ({task['name']}) failed: {_last_line(str(err))}; "
                                  f"log: {task['stderr']}") from None
            task["state"] = "COMPLETED"
            task["result"] = results[0] if len(results) == 1 else results
    finally:
        entry["finished"] = time.time()
        display.update([entry])
        display.close()


def _last_line(text: str) -> str:
    """The most telling line of a traceback: the exception itself."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("You can check", "or at paths", "- /", "File ")):
            return ln[:300]
    return (lines[-1] if lines else "no error output")[:300]


# ---------------------------------------------------------------------------------------------- dry run


def render_dry_run(exp: Experiment, jobs: list[JobPlan]) -> str:
    """The dependency graph and each job's sbatch script, ids shown as <key>."""
    ids = {j.key: f"<{j.key}>" for j in jobs}
    lines = [f"# experiment {exp.name}: {exp.exp_dir}", "# dependency graph"]
    for job in jobs:
        dep = dependency_string(job, ids) or "none"
        what = f"array[{len(job.tasks)}] " + ", ".join(t.name for t in job.tasks) if job.is_array else job.tasks[0].name
        lines.append(f"{job.key:<12} {what}  <- {dep}")
    folder = exp.exp_dir / "slurm" / "<launch>" / "%j"
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    for job in jobs:
        params = slurm_parameters(job, exp, dependency_string(job, ids))
        lines += ["", f"# ---- sbatch script: {job.key} ----", sbatch_script(command, folder, params,
                                                                          len(job.tasks) if job.is_array else None)]
        for task in job.tasks:
            lines.append(f"# {task.name}: {task.config} {' '.join(shlex.quote(o) for o in task.overrides)}".rstrip())
    return "\n".join(lines)


def sbatch_script(command: str, folder: Path, params: dict[str, Any], array: int | None) -> str:
    """submitit's own sbatch text (a private function, so wrapped); a plain rendering if it is unavailable."""
    try:
        from submitit.slurm.slurm import _make_sbatch_string

        return _make_sbatch_string(command=command, folder=str(folder), map_count=array, **params)
    except (ImportError, TypeError):  # submitit changed its private API: render the options ourselves
        opts = {k: v for k, v in params.items()
                if k not in ("additional_parameters", "setup", "signal_delay_s", "srun_args")}
        opts.update(params.get("additional_parameters", {}))
        opts["signal"] = f"USR2@{params.get('signal_delay_s', 90)}"
        if array:
            opts["array"] = f"0-{array - 1}"
        out = ["#!/bin/bash"] + [f"#SBATCH --{k.replace('_', '-')}={shlex.quote(str(v))}" for k, v in sorted(opts.items())]
        srun = " ".join(["srun", *params.get("srun_args", []), command])
        return "\n".join(out + list(params.get("setup", [])) + [srun])


# ---------------------------------------------------------------------------------------------- status


def status(exp_dir: str | Path) -> list[dict[str, Any]]:
    """One row per task of the latest launch in exp_dir: job, state (sacct for slurm), log and TensorBoard paths."""
    exp_dir = Path(exp_dir)
    path = exp_dir / "launch.json"
    if not path.is_file():
        raise LaunchError(f"{exp_dir}: no launch.json (not an experiment folder launched by `hpcdistill launch`)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LaunchError(f"{path}: invalid JSON ({err.msg})") from None
    states = _sacct_states([j["slurm_id"] for j in record["jobs"]]) if record.get("cluster") == "slurm" else {}
    rows = []
    for job in record["jobs"]:
        for task in job["tasks"]:
            state = states.get(task["job_id"])
            if task["job_id"] is None:  # a local launch has not started it yet
                state = task.get("state") or "PENDING"
            elif state in (None, "RUNNING", "COMPLETING"):  # the result file is written just before the step ends
                running = "RUNNING" if record.get("cluster") != "slurm" else "UNKNOWN"  # local: started, no result
                state = _result_state(task) or state or task.get("state") or running
            progress = describe(read_progress(task["run_dir"])) if job["kind"] != "evaluate" else "-"
            rows.append({"job": job["key"], "task": task["name"], "job_id": task["job_id"], "state": state,
                         "progress": progress, "run_dir": task["run_dir"], "log": task["stdout"],
                         "tensorboard": task["tensorboard"]})
    return rows


def _sacct_states(ids: list[str]) -> dict[str, str]:
    """{job id ("12" or "12_0"): state}; {} where sacct is unavailable (e.g. status read off the cluster)."""
    if not ids:
        return {}
    cmd = ["sacct", "-n", "-X", "-P", "-o", "JobID,State", *[a for i in ids for a in ("-j", i)]]
    try:
        out = subprocess.run(cmd, check=True, text=True, capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states: dict[str, str] = {}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        if not (job_id and state):
            continue
        state = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
        base, bracket, ranges = job_id.partition("_[")  # a pending array is one line: 12_[0-3%4]
        if not bracket:
            states[job_id] = state
            continue
        for part in ranges.rstrip("]").split("%")[0].split(","):
            low, _, high = part.partition("-")
            if low.isdigit():
                for index in range(int(low), int(high or low) + 1):
                    states[f"{base}_{index}"] = state
    return states


def _result_state(task: dict[str, Any]) -> str | None:
    """From submitit's result file next to the log: COMPLETED / FAILED, or None while there is none."""
    folder = Path(task["stdout"]).parent
    found = list(folder.glob(f"{task['job_id']}_*_result.pkl"))
    if not found:
        return None
    import submitit

    outcome, _ = submitit.core.utils.pickle_load(found[0])
    return "COMPLETED" if outcome == "success" else "FAILED"


def format_status(rows: list[dict[str, Any]]) -> str:
    """A plain text table of `status()` rows."""
    cols = ["job", "task", "job_id", "state", "progress", "log", "tensorboard"]
    table = [cols] + [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)
