"""The experiment launcher: parsing errors, the job graph, dry-run sbatch scripts (no SLURM), then real runs on
shards cut by the real sharder (conftest's `small_dataset` and `tiny_dataset`): laptop launches, and on the local
SLURM from slurm/cluster.sh an experiment end to end, 2 ranks, a time-limit requeue with resume, a preemption, a
crash."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import SLURM_FINAL_STATES, sacct_wait_final

from hpcdistill.cluster.job_plan import dependency_string, slurm_parameters
from hpcdistill.cluster.resubmitting import master_port
from hpcdistill.cluster.status import format_status, status
from hpcdistill.common.config import load_config
from hpcdistill.common.errors import LaunchError
from hpcdistill.data.streams import per_rank_samples
from hpcdistill.experiment.experiment_file import load_experiment
from hpcdistill.experiment.graph import callables_for, plan_jobs
from hpcdistill.experiment.launch import launch

REPO = Path(__file__).resolve().parents[1]
# Tiny network, few steps, CPU fp32; every phase of configs/demo runs in seconds.
TINY = [
    "model.width=8",
    "model.groups=4",
    "train.epochs=1",
    "train.grad_accum=1",
    "log.progress=false",
    "data.sampler=ordered",
    "log.log_every=1",
]
CPU = {
    "nodes": 1,
    "gpus_per_node": 0,
    "tasks_per_node": 1,
    "cpus_per_task": 1,
    "mem_gb": 2,
    "timeout_min": 10,
    "signal_delay_s": 30,
    "max_requeue": 3,
}


def write_experiment(tmp: Path, name: str = "exp", **over) -> Path:
    exp = {
        "name": name,
        "out_dir": str(tmp / "runs"),
        "shards": str(tmp / "shards"),
        "mags": [5, 2.5],
        "teacher": {"config": "configs/demo/teacher.yaml", "overrides": list(TINY)},
        "methods": {
            "baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline", "overrides": list(TINY)},
            "kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": list(TINY)},
            "kd_ft": {
                "config": "configs/demo/finetune.yaml",
                "label": "KD+FT",
                "init_from": "kd",
                "overrides": list(TINY),
            },
        },
        "evaluate": {"split": "test", "iterations": 100},
        "resources": {
            "default": dict(CPU, partition="gpu-long", account="lab42", sbatch={"exclusive": True}),
            "teacher": {"nodes": 2, "tasks_per_node": 2},
        },
    }
    exp.update(over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def error_of(tmp: Path, **over) -> str:
    with pytest.raises(LaunchError) as info:
        load_experiment(write_experiment(tmp, **over))
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- unit (no SLURM)


def test_experiment_errors_name_the_key(tmp_path):
    assert "methdos: unknown key (did you mean methods?)" in error_of(tmp_path, methdos={})
    res = {"default": dict(CPU, gpus=1)}
    assert "resources.default.gpus: unknown key" in error_of(tmp_path, resources=res)
    assert "resources.studnet: unknown job kind" in error_of(tmp_path, resources={"default": CPU, "studnet": {}})
    bad = {"kd": {"config": "configs/demo/distill.yaml", "lable": "KD"}}
    assert "methods.kd.lable: unknown key (did you mean methods.kd.label?)" in error_of(tmp_path, methods=bad)
    bad = {"ft": {"config": "configs/demo/finetune.yaml", "init_from": "kdd"}}
    assert "methods.ft.init_from: 'kdd' is not a method" in error_of(tmp_path, methods=bad)
    bad = {"kd": {"config": "configs/demo/nope.yaml"}}
    assert "methods.kd.config: configs/demo/nope.yaml: no such file" in error_of(tmp_path, methods=bad)
    msg = error_of(tmp_path, resources={"default": dict(CPU, timeout_min=1, signal_delay_s=90)})
    assert "resources.default.timeout_min: 1 min must exceed signal_delay_s (90 s)" in msg
    msg = error_of(tmp_path, resources={"default": dict(CPU, gpus_per_node=4, tasks_per_node=2)})
    assert "resources.default.tasks_per_node" in msg and "one task per GPU" in msg
    assert "mags:" in error_of(tmp_path, mags=["fast"])
    assert "name: required" in error_of(tmp_path, name="")
    assert "evaluate.iterations: expected int" in error_of(tmp_path, evaluate={"iterations": "many"})


def test_bad_training_override_fails_before_submitting(tmp_path):
    path = write_experiment(
        tmp_path, methods={"kd": {"config": "configs/demo/distill.yaml", "overrides": ["train.lr=fast"]}}
    )
    with pytest.raises(LaunchError, match=r"methods\.kd \(kd-5x\): train\.lr: expected float"):
        launch(path, cluster="slurm", dry_run=True)


def test_a_deepspeed_json_setting_a_config_key_fails_before_submitting(tmp_path):
    """The typed config owns lr, micro-batch, accumulation and precision: a JSON that sets one is refused by
    `launch --dry-run`, before anything is queued, not by the job on the cluster."""
    ds = tmp_path / "my_ds.json"
    ds.write_text('{"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}')
    path = write_experiment(
        tmp_path, methods={"kd": {"config": "configs/demo/distill.yaml", "overrides": [f"deepspeed={ds}"]}}
    )
    with pytest.raises(
        LaunchError,
        match=r"methods\.kd \(kd-5x\): deepspeed: .*my_ds\.json: sets optimizer\.params\.lr, "
        r"which the config owns \(train\.lr\)",
    ):
        launch(path, cluster="slurm", dry_run=True)


def test_graph_dependencies_and_task_overrides(tmp_path):
    exp = load_experiment(write_experiment(tmp_path))
    jobs = {j.key: j for j in plan_jobs(exp)}
    assert list(jobs) == ["teacher", "baseline", "kd", "kd_ft", "evaluate"]  # sources before init_from
    assert jobs["baseline"].after_ok == []  # never reads the teacher: starts at once
    assert jobs["kd"].after_ok == ["teacher"] and jobs["kd_ft"].after_corr == ["kd"]
    assert jobs["evaluate"].after_ok == ["teacher", "baseline", "kd", "kd_ft"]
    ids = {"teacher": "11", "baseline": "12", "kd": "13", "kd_ft": "14"}
    assert dependency_string(jobs["kd_ft"], ids) == "aftercorr:13"
    assert dependency_string(jobs["evaluate"], ids) == "afterok:11,afterok:12,afterok:13,afterok:14"
    exp_dir = Path(exp.out_dir) / "exp"
    ft = jobs["kd_ft"].tasks[1]
    assert (ft.name, ft.mag, ft.run_dir) == ("kd_ft-2.5x", 2.5, str(exp_dir / "kd_ft-2.5x"))
    assert f"model.init={exp_dir / 'kd-2.5x' / 'best.pt'}" in ft.overrides and "data.mag=2.5" in ft.overrides
    kd = jobs["kd"].tasks[0]
    assert f"teacher.checkpoint={exp_dir / 'teacher' / 'best.pt'}" in kd.overrides
    assert not any(o.startswith("teacher.checkpoint") for o in jobs["baseline"].tasks[0].overrides)
    assert jobs["teacher"].resources.nodes == 2 and jobs["teacher"].resources.tasks == 2
    assert jobs["evaluate"].resources.tasks == 1 and jobs["evaluate"].resources.nodes == 1
    # the launcher's overrides come last, so they win over the method's own
    cfg = load_config(kd.config, kd.overrides)
    assert (cfg.run_dir, cfg.data.mag, cfg.model.width) == (exp_dir / "kd-5x", 5.0, 8)


def test_dry_run_prints_sbatch_scripts_and_graph(tmp_path, capsys):
    out = launch(write_experiment(tmp_path), cluster="slurm", dry_run=True)
    text = capsys.readouterr().out
    assert text.strip() == out["text"].strip()
    assert not (tmp_path / "runs").exists()  # nothing written, nothing submitted
    scripts = dict(re.findall(r"# ---- sbatch script: (\S+) ----\n(.*?)(?=\n# ---- sbatch|\Z)", text, re.S))
    assert set(scripts) == {"teacher", "baseline", "kd", "kd_ft", "evaluate"}
    for script in scripts.values():
        assert "#SBATCH --partition=gpu-long" in script and "#SBATCH --account=lab42" in script
        assert "#SBATCH --exclusive" in script and "#SBATCH --kill-on-invalid-dep=yes" in script
        assert "#SBATCH --signal=USR2@30" in script and "#SBATCH --time=10" in script
        assert "gpus-per-node" not in script  # CPU cluster: no GPU request
    assert "#SBATCH --nodes=2" in scripts["teacher"] and "#SBATCH --ntasks-per-node=2" in scripts["teacher"]
    assert "--array" not in scripts["teacher"] and "--dependency" not in scripts["teacher"]
    assert re.search(r"^srun .*--kill-on-bad-exit=1", scripts["teacher"], re.M)  # 4 ranks: one dies, all stop
    assert "--kill-on-bad-exit" not in scripts["kd"]  # one task per array element
    assert "#SBATCH --array=0-1%2" in scripts["kd"] and "#SBATCH --dependency='afterok:<teacher>'" in scripts["kd"]
    assert "%A_%a/%A_%a_0_log.out" in scripts["kd"]  # logs under the launch folder by SLURM's array convention
    assert "#SBATCH --dependency='aftercorr:<kd>'" in scripts["kd_ft"]
    assert "--dependency" not in scripts["baseline"]
    assert (
        "#SBATCH --dependency='afterok:<teacher>,afterok:<baseline>,afterok:<kd>,afterok:<kd_ft>'"
        in scripts["evaluate"]
    )  # ids shown as <job>
    assert re.search(r"^kd_ft\s+array\[2\] kd_ft-5x, kd_ft-2\.5x\s+<- aftercorr:<kd>$", text, re.M)
    assert out["graph"]["evaluate"]["after_ok"] == ["teacher", "baseline", "kd", "kd_ft"]


def test_gpu_resources_give_one_task_per_gpu(tmp_path):
    res = {
        "default": dict(CPU, gpus_per_node=4, tasks_per_node=0),
        "evaluate": {"gpus_per_node": 0, "cpus_per_task": 4},
    }
    exp = load_experiment(write_experiment(tmp_path, resources=res))
    jobs = {j.key: j for j in plan_jobs(exp)}
    params = slurm_parameters(jobs["kd"], exp.name, "afterok:1")
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["dependency"]) == (4, 4, "afterok:1")
    assert "gpus_per_node" not in slurm_parameters(jobs["evaluate"], exp.name, None)
    (evaluate,) = callables_for(jobs["evaluate"], exp, list(jobs.values()))
    assert evaluate.workers == 3  # the evaluation job's other CPUs decode shards


def test_every_shipped_experiment_parses_and_dry_runs(capsys):
    files = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert [f.stem for f in files] == ["celiac", "demo"]
    for path in files:
        out = launch(path, cluster="slurm", dry_run=True)  # every task's training config is loaded and checked
        assert out["dry_run"] and "#SBATCH" in out["text"] and list(out["graph"])[-1] == "evaluate", path
    celiac = load_experiment(REPO / "configs" / "experiments" / "celiac.yaml")
    assert celiac.resources_for("kd").partition == "YOUR_PARTITION" and celiac.mags == [5.0, 2.5, 1.25, 0.625]
    demo = load_experiment(REPO / "configs" / "experiments" / "demo.yaml")
    assert demo.exp_dir.name == "demo-experiment"  # not runs/demo, where `make demo` writes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_experiment_file_runs_end_to_end_locally_with_progress_and_status(tiny_dataset, tmp_path):
    """configs/experiments/demo.yaml as shipped, shortened (tiny network, one epoch, one magnification), on the
    sharder's real shards, through `hpcdistill launch --cluster local`; `status` is asked while it runs."""
    exp = yaml.safe_load((REPO / "configs" / "experiments" / "demo.yaml").read_text())
    short = TINY + ["data.epoch_samples=4"]
    exp.update(out_dir=str(tmp_path / "runs"), shards=str(tiny_dataset["shards"]), mags=[2.5])
    for job in [exp["teacher"], *exp["methods"].values()]:
        job["overrides"] = job.get("overrides", []) + short
    exp["evaluate"]["iterations"] = 50
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(exp))
    exp_dir = tmp_path / "runs" / "demo-experiment"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdistill.cli.main", "launch", str(path), "--cluster", "local"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_running = []
    while proc.poll() is None:
        if (exp_dir / "launch.json").is_file():
            rows = status(exp_dir)  # during the run, as on SLURM
            seen_running += [r for r in rows if r["state"] not in ("COMPLETED", "FAILED")]
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert seen_running, "status never saw a job still running"
    rows = status(exp_dir)
    assert list(exp["methods"]) == ["baseline", "kd", "kd_adv1", "kd_adv2"]  # the shipped demo experiment
    assert [r["task"] for r in rows] == [
        "teacher",
        "baseline-2.5x",
        "kd-2.5x",
        "kd_adv1-2.5x",
        "kd_adv2-2.5x",
        "evaluate",
    ]
    assert all(r["state"] == "COMPLETED" for r in rows) and (exp_dir / "report" / "report.md").is_file()
    report = (exp_dir / "report" / "report.md").read_text()
    for name, method in exp["methods"].items():
        record = json.loads((exp_dir / f"{name}-2.5x" / "eval" / "test.json").read_text())
        assert record["method"] == method["label"] and method["label"] in report
        assert record["samples"] == tiny_dataset["manifest"]["splits"]["test"]["samples"]
    assert rows[0]["progress"].startswith("done at step ")
    shown = subprocess.run(
        [sys.executable, "-m", "hpcdistill.cli.main", "status", str(exp_dir)], cwd=REPO, capture_output=True, text=True
    )  # the command users type
    assert shown.returncode == 0, shown.stderr
    table = [line.split() for line in shown.stdout.splitlines()[1:]]
    assert [(cells[1], cells[3]) for cells in table] == [(r["task"], "COMPLETED") for r in rows]
    assert "  teacher: teacher  " in stdout and "kd_adv2: kd_adv2-2.5x" in stdout  # progress lines, not a TTY
    assert not list(exp_dir.rglob("%j")), "literal %j folders"


def test_master_port_is_shared_by_a_jobs_tasks_and_differs_between_jobs():
    assert master_port("1234") == master_port("1234") != master_port("1235")
    assert 20000 <= master_port("abc-uuid") < 40000


# ---------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def shards(small_dataset) -> Path:
    """The real sharder's output on small synthetic slides (mags 10, 5 and 2.5; several uneven shards per split)."""
    return small_dataset["shards"]


def tiny_experiment(tmp: Path, shards: Path, name: str, methods: dict, **over) -> Path:
    path = write_experiment(tmp, name=name, shards=str(shards), methods=methods, **over)
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_laptop_clusters_run_the_stages_in_order(tmp_path, shards, cluster):
    methods = {"kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": TINY}}
    path = tiny_experiment(tmp_path, shards, "dbg", methods, mags=[2.5], resources={"default": CPU})
    record = launch(path, cluster=cluster)
    exp_dir = tmp_path / "runs" / "dbg"
    assert [j["key"] for j in record["jobs"]] == ["teacher", "kd", "evaluate"]
    assert record["jobs"][1]["tasks"][0]["result"]["mode"] == "distill"
    assert (exp_dir / "kd-2.5x" / "eval" / "test.json").is_file() and (exp_dir / "report" / "report.md").is_file()
    rows = status(exp_dir)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 3
    assert "kd-2.5x" in format_status(rows) and json.loads((exp_dir / "launch.json").read_text())["cluster"] == cluster
    if cluster == "debug":  # relaunching a finished experiment retrains nothing: each run returns from its checkpoint
        from hpcdistill.train.run_folder import complete_checkpoints

        run_dir = exp_dir / "kd-2.5x"
        before = (sorted(complete_checkpoints(run_dir / "checkpoints")), (run_dir / "best.pt").read_bytes())
        again = launch(path, cluster=cluster)
        assert again["jobs"][1]["tasks"][0]["result"] == record["jobs"][1]["tasks"][0]["result"]
        assert (sorted(complete_checkpoints(run_dir / "checkpoints")), (run_dir / "best.pt").read_bytes()) == before


@pytest.fixture(scope="module")
def slurm_experiment(slurm_cluster, shards, tmp_path_factory):
    """Teacher on 2 ranks -> a KD array over 2 magnifications -> evaluation + report, on the real local SLURM."""
    tmp = tmp_path_factory.mktemp("slurm-e2e")
    methods = {"kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": TINY}}
    resources = {"default": CPU, "teacher": {"tasks_per_node": 2}}
    path = tiny_experiment(tmp, shards, "e2e", methods, resources=resources)
    t0 = time.monotonic()
    record = launch(path, cluster="slurm", wait=True, wait_timeout_s=240)
    return record, tmp / "runs" / "e2e", time.monotonic() - t0


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_experiment_end_to_end(slurm_experiment, small_dataset):
    record, exp_dir, seconds = slurm_experiment
    jobs = {j["key"]: j for j in record["jobs"]}
    assert list(jobs) == ["teacher", "kd", "evaluate"]
    kd = jobs["kd"]
    assert kd["array"] and [t["job_id"] for t in kd["tasks"]] == [f"{kd['slurm_id']}_0", f"{kd['slurm_id']}_1"]
    assert kd["dependency"] == f"afterok:{jobs['teacher']['slurm_id']}"
    assert [t["result"]["run_dir"] for t in kd["tasks"]] == [str(exp_dir / "kd-5x"), str(exp_dir / "kd-2.5x")]
    for mag in ("5x", "2.5x"):
        rec = json.loads((exp_dir / f"kd-{mag}" / "eval" / "test.json").read_text())
        assert rec["method"] == "KD" and rec["mag"] == float(mag[:-1])
        assert rec["samples"] == small_dataset["manifest"]["splits"]["test"]["samples"]  # every test tissue scored
        assert list((exp_dir / f"kd-{mag}" / "tb").glob("events.out.tfevents.*"))
    report = (exp_dir / "report" / "report.md").read_text()
    assert "KD" in report and jobs["evaluate"]["tasks"][0]["result"]["report"] == str(exp_dir / "report" / "report.md")
    assert Path(kd["tasks"][1]["stdout"]).is_file() and f"{kd['slurm_id']}_1" in kd["tasks"][1]["stdout"]
    rows = status(exp_dir)
    assert [r["state"] for r in rows] == ["COMPLETED"] * 4
    print(f"end-to-end experiment on SLURM: {seconds:.0f}s")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_two_task_job_trains_with_two_ranks(slurm_experiment, small_dataset):
    record, exp_dir, _ = slurm_experiment
    teacher = record["jobs"][0]
    assert teacher["ntasks"] == 2
    results = teacher["tasks"][0]["result"]
    assert isinstance(results, list) and len(results) == 2  # one result per rank
    # the train samples over world size 2 at 1 sample per step: half the steps of one rank, the same on both
    train = small_dataset["manifest"]["splits"]["train"]["samples"]
    steps = per_rank_samples(train, 2, 1)
    assert steps == -(-train // 2) and [r["global_step"] for r in results] == [steps, steps]
    assert results[0]["best"] == results[1]["best"]  # validated together: both ranks agree on the best epoch
    log = Path(teacher["tasks"][0]["stdout"]).read_text()
    assert "rank 0/2" in log
    assert "rank 1/2" in Path(teacher["tasks"][0]["stdout"].replace("_0_log.out", "_1_log.out")).read_text()


def logged_steps(tb_dir: Path) -> list[list[int]]:
    """loss/total steps of each TensorBoard event file (one file per run of the job), in run order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    runs = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        steps = [
            e.step
            for e in EventFileLoader(str(path)).Load()
            if e.HasField("summary") and any(v.tag == "loss/total" for v in e.summary.value)
        ]
        if steps:
            runs.append(steps)
    return runs


def final_history(job_id: str, timeout_s: float = 60) -> list[str]:
    """sacct's states for every run of a job, once the last one is final."""
    return [state for state, _ in sacct_wait_final(job_id, timeout_s)]


def check_resumed_runs(task: dict, every: int, runs_expected: int) -> tuple[list[int], list[list[int]]]:
    """Each rerun of the job loaded the latest checkpoint and went on from the step after it; only the steps between
    that checkpoint and the kill were done twice."""
    log = Path(task["stdout"]).read_text()
    resumed = [int(m) for m in re.findall(r"resuming from \S*/step(\d+)", log)]
    assert log.count("starting fresh") == 1 and len(resumed) == runs_expected - 1, log[-2000:]
    runs = logged_steps(Path(task["tensorboard"]))
    assert len(runs) == runs_expected
    for before, after, start in zip(runs, runs[1:], resumed):
        assert start >= every and start % every == 0  # a checkpoint written by the run before
        assert after[0] == start + 1  # the rerun continues right after the checkpoint it loaded
        assert 0 <= before[-1] - start <= every  # only the steps after the last checkpoint were done twice
    return resumed, runs


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_time_limit_requeues_resumes_and_bounds_the_requeues(slurm_cluster, shards, tmp_path):
    # Training that no two 1-minute runs can finish, with one requeue allowed. slurmctld checks time limits every 30 s
    # and signals up to one check early, so with a 5 s delay the signal comes 25-55 s into each run, whatever the
    # machine's speed: the first run is requeued, the second resumes from the latest checkpoint and, signalled
    # again, ends the job as failed in one line instead of requeueing forever.
    every = 200
    overrides = [*TINY, "data.epoch_samples=1000000", f"train.checkpoint_every_steps={every}", "data.val=[]"]
    resources = {"default": dict(CPU, timeout_min=1, signal_delay_s=5, max_requeue=1)}
    path = tiny_experiment(
        tmp_path,
        shards,
        "timelimit",
        {},
        resources=resources,
        evaluate={"enabled": False},
        teacher={"config": "configs/demo/teacher.yaml", "overrides": overrides},
    )
    with pytest.raises(LaunchError) as info:
        launch(path, cluster="slurm", wait=True, wait_timeout_s=240)
    message = str(info.value)
    assert message.startswith("teacher: job ") and "timed-out too many times" in message and "\n" not in message
    task = json.loads((tmp_path / "runs" / "timelimit" / "launch.json").read_text())["jobs"][0]["tasks"][0]
    assert final_history(task["job_id"]) == ["REQUEUED", "FAILED"]
    (start,), runs = check_resumed_runs(task, every, runs_expected=2)
    assert runs[1][-1] > start + every  # the second run made progress of its own before its signal


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slurm_preempted_job_resumes_and_completes(slurm_cluster, shards, tmp_path):
    # Preemption with PreemptMode=REQUEUE kills the job and queues it again, with no signal to catch first:
    # `scontrol requeue` does exactly that, here as soon as the first checkpoint is complete. The rerun resumes.
    # On the small real shards a step takes ~10 ms on one core: the first checkpoint comes ~1.5 s into training,
    # the whole run takes ~30 s, so the requeue always lands in between.
    steps, every = 3000, 150
    overrides = [*TINY, f"data.epoch_samples={steps}", f"train.checkpoint_every_steps={every}", "data.val=[]"]
    path = tiny_experiment(
        tmp_path,
        shards,
        "preempt",
        {},
        resources={"default": CPU},
        evaluate={"enabled": False},
        teacher={"config": "configs/demo/teacher.yaml", "overrides": overrides},
    )
    from hpcdistill.train.run_folder import complete_checkpoints

    exp_dir = tmp_path / "runs" / "preempt"
    with ThreadPoolExecutor(1) as pool:
        launched = pool.submit(launch, path, cluster="slurm", wait=True, wait_timeout_s=240)
        deadline = time.monotonic() + 120
        while not complete_checkpoints(exp_dir / "teacher" / "checkpoints") and time.monotonic() < deadline:
            assert not launched.done(), launched.exception()
            time.sleep(0.1)
        job_id = json.loads((exp_dir / "launch.json").read_text())["jobs"][0]["tasks"][0]["job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=30)
        record = launched.result()
    task = record["jobs"][0]["tasks"][0]
    assert task["result"]["global_step"] == steps and not task["result"]["stopped_early"]
    assert final_history(job_id) == ["REQUEUED", "COMPLETED"]
    _, runs = check_resumed_runs(task, every, runs_expected=2)
    assert sorted(set(s for run in runs for s in run)) == list(range(1, steps + 1))


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_slurm_multi_task_job_ends_when_one_rank_dies(slurm_cluster, tmp_path):
    # The launcher's parameters for a 2-rank job, on a job whose rank 1 dies at once while rank 0 would wait 5
    # minutes (as in a collective): the job must end FAILED right away, rank 0 killed.
    import submitit

    exp = load_experiment(write_experiment(tmp_path, resources={"default": dict(CPU, tasks_per_node=2)}))
    ex = submitit.SlurmExecutor(folder=tmp_path / "%j", max_num_timeout=0)
    ex.update_parameters(**slurm_parameters(plan_jobs(exp)[0], exp.name, None))
    marker = tmp_path / "rank0-finished"
    job = ex.submit(
        submitit.helpers.CommandFunction(
            ["bash", "-c", f'if [ "$SLURM_PROCID" = 1 ]; then exit 3; fi; sleep 300; touch {marker}']
        )
    )
    deadline = time.monotonic() + 150
    while not job.done(force_check=True) and time.monotonic() < deadline:
        time.sleep(2)
    assert final_history(job.job_id) == ["FAILED"] and not marker.exists()


def test_finished_task_ignores_a_late_time_limit_signal(tmp_path):
    # The signal can land after the work is done, while the interpreter shuts down and has already put SIGUSR2 back
    # to its default action (terminate): the job's result is written, yet SLURM would record FAILED.
    script = textwrap.dedent("""
        import os, signal, sys
        from hpcdistill.cluster.resubmitting import ignore_requeue_signal
        signal.signal(signal.SIGUSR2, lambda *_: print("requeue", flush=True))  # as submitit's handler
        ignore_requeue_signal()
        os.kill(os.getpid(), signal.SIGUSR2)
        print("alive", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["alive"], done.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_slurm_crashing_job_is_reported_failed(slurm_cluster, shards, tmp_path):
    methods = {"kd": {"config": "configs/demo/distill.yaml", "overrides": TINY}}
    teacher = {"config": "configs/demo/teacher.yaml", "overrides": [*TINY, "model.num_classes=5"]}  # manifest has 3
    path = tiny_experiment(tmp_path, shards, "crash", methods, teacher=teacher, resources={"default": CPU})
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(path, cluster="slurm", wait=True, wait_timeout_s=150)
    message = str(info.value)
    assert message.startswith("teacher: job ") and "failed" in message and "model.num_classes: 5" in message
    assert "\n" not in message and time.monotonic() - t0 < 150
    exp_dir = tmp_path / "runs" / "crash"
    deadline = time.monotonic() + 60
    while True:  # SLURM cancels the dependants (kill-on-invalid-dep) instead of leaving them pending
        states = {r["task"]: r["state"] for r in status(exp_dir)}
        # every dependant, evaluate included: SLURM may cancel them in different scheduler passes, and a job sacct
        # has not recorded yet reads UNKNOWN
        if set(states.values()) <= SLURM_FINAL_STATES or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert states == {"teacher": "FAILED", "kd-5x": "CANCELLED", "kd-2.5x": "CANCELLED", "evaluate": "CANCELLED"}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_seeds_repeat_every_run_and_the_report_pools_them(tiny_dataset, tmp_path):
    """`seeds: [0, 1]` with --cluster local: a teacher, a baseline and a KD run per seed, seed in each run name and
    config; the report gives mean ± sd over seeds and the seed-pooled paired differences."""
    import yaml

    short = [*TINY, "data.epoch_samples=4", "model.arch=resnet10"]
    methods = {
        "baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline", "overrides": short},
        "kd": {"config": "configs/demo/distill.yaml", "label": "KD", "overrides": short},
    }
    path = tiny_experiment(
        tmp_path,
        tiny_dataset["shards"],
        "seeded",
        methods,
        mags=[2.5],
        seeds=[0, 1],
        teacher={"config": "configs/demo/teacher.yaml", "overrides": short},
        evaluate={"split": "test", "iterations": 100},
        resources={"default": CPU},
    )
    jobs = {j.key: j for j in plan_jobs(load_experiment(path))}
    assert [t.name for t in jobs["kd"].tasks] == ["kd-2.5x-s0", "kd-2.5x-s1"] and jobs["teacher"].is_array
    assert any(o.endswith("teacher-s1/best.pt") for o in jobs["kd"].tasks[1].overrides)
    launch(path, cluster="local")
    exp_dir = tmp_path / "runs" / "seeded"
    for run in ("teacher-s0", "teacher-s1", "baseline-2.5x-s1", "kd-2.5x-s0"):
        assert yaml.safe_load((exp_dir / run / "config.yaml").read_text())["run"]["seed"] == int(run[-1])
    report = (exp_dir / "report" / "report.md").read_text()
    assert "## Over training seeds" in report and "| 2.5x | Baseline | 2 |" in report and "s0: " in report
    assert "| 2.5x | KD − Baseline | 2 |" in report  # the paired difference pooled over both seeds
