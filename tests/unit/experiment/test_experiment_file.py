"""The experiment file and its graph without SLURM: one-line errors naming the key, bad overrides refused before
anything is submitted, dependencies, the dry run's sbatch scripts, GPU resources, every shipped experiment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from launch_helpers import CPU, error_of, write_experiment

from hpcdistill.cluster.job_plan import dependency_string, slurm_parameters
from hpcdistill.common.errors import LaunchError
from hpcdistill.config.loading import load_config
from hpcdistill.experiment.experiment_file import load_experiment
from hpcdistill.experiment.graph import callables_for, plan_jobs
from hpcdistill.experiment.launch import launch_experiment

REPO = Path(__file__).resolve().parents[3]


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
        launch_experiment(path, cluster="slurm", dry_run=True)


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
        launch_experiment(path, cluster="slurm", dry_run=True)


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
    out = launch_experiment(write_experiment(tmp_path), cluster="slurm", dry_run=True)
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
    assert evaluate.options.workers == 3  # the evaluation job's other CPUs decode shards


def test_every_shipped_experiment_parses_and_dry_runs(capsys):
    files = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert [f.stem for f in files] == ["celiac", "demo"]
    for path in files:
        out = launch_experiment(
            path, cluster="slurm", dry_run=True
        )  # every task's training config is loaded and checked
        assert out["dry_run"] and "#SBATCH" in out["text"] and list(out["graph"])[-1] == "evaluate", path
    celiac = load_experiment(REPO / "configs" / "experiments" / "celiac.yaml")
    assert celiac.resources_for("kd").partition == "YOUR_PARTITION" and celiac.mags == [5.0, 2.5, 1.25, 0.625]
    demo = load_experiment(REPO / "configs" / "experiments" / "demo.yaml")
    assert demo.exp_dir.name == "demo-experiment"  # not runs/demo, where `make demo` writes


def test_the_graph_shows_the_teacher_gate_and_a_gate_against_the_baseline_waits_for_it(tmp_path, capsys):
    kd = {"config": "configs/demo/distill.yaml", "label": "KD", "gate_against": "baseline", "overrides": []}
    methods = {"baseline": {"config": "configs/demo/baseline.yaml", "label": "Baseline"}, "kd": kd}
    path = write_experiment(tmp_path, methods=methods)
    text = launch_experiment(path, cluster="slurm", dry_run=True)["text"]
    assert re.search(
        r"^kd\s+array\[2\].*\n\s+gate: teacher val accuracy >= 0\.9 and > baseline's \(refuse\)$", text, re.M
    )
    assert "#SBATCH --dependency='afterok:<teacher>,afterok:<baseline>'" in text
    jobs = {j.key: j for j in plan_jobs(load_experiment(path))}
    runs = tmp_path / "runs" / "exp"
    assert f"teacher.reference={runs / 'baseline-5x' / 'best.pt'}" in jobs["kd"].tasks[0].overrides
    assert jobs["baseline"].gate == "" and [j.key for j in plan_jobs(load_experiment(path))][:2] == [
        "teacher",
        "baseline",
    ]
    methods["kd"]["gate_against"] = "nope"
    assert "methods.kd.gate_against: 'nope' is not a method" in error_of(tmp_path, methods=methods)
