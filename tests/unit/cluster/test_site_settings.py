"""What a site sets for its jobs, in one resources block: the jobs' interpreter (a container or an environment),
requeue in every script whose job relies on it, and `shard|predict --cluster --resources FILE` reading the same
block as `launch`, with the flags over it."""

from __future__ import annotations

import argparse
import sys

import pytest
import yaml

from hpcdistill.cli.array_flags import add_cluster_flags, cluster_resources
from hpcdistill.cli.main import build_parser
from hpcdistill.cluster.dry_run import render_dry_run
from hpcdistill.cluster.job_plan import JobPlan, Resources, TaskPlan, slurm_parameters
from hpcdistill.common.errors import HpcdistillError


def plan(resources: Resources) -> JobPlan:
    task = TaskPlan(name="t0", mag=None, run_dir="/tmp/x", config="", overrides=[])
    return JobPlan(key="shard", kind="shard", resources=resources, tasks=[task])


def test_requeue_is_requested_where_jobs_requeue_and_the_interpreter_is_the_one_given(tmp_path):
    relies = slurm_parameters(plan(Resources(max_requeue=3)), "exp", None)
    assert relies["additional_parameters"]["requeue"] is True
    never = slurm_parameters(plan(Resources(max_requeue=0)), "exp", None)
    assert "requeue" not in never["additional_parameters"]
    container = "apptainer exec --nv /images/hpcdistill.sif python"
    text = render_dry_run("exp", tmp_path, [plan(Resources(max_requeue=3, python=container))])
    assert (
        "#SBATCH --requeue" in text and "srun --unbuffered --output" in text and f"{container} -u -m submitit" in text
    )


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    add_cluster_flags(parser, "test")
    return parser.parse_args(list(argv))


def test_one_resources_block_serves_shard_and_predict_with_the_flags_over_it(tmp_path):
    experiment = tmp_path / "exp.yaml"
    resources = {
        "default": {"partition": "cpu", "account": "lab42", "constraint": "avx512", "setup": ["module load vips"]},
        "predict": {"gpus_per_node": 1, "python": "conda run -n hpcd python", "sbatch": {"exclusive": True}},
    }
    experiment.write_text(yaml.safe_dump({"name": "x", "resources": resources}))
    shard = cluster_resources(parsed("--resources", str(experiment)), "shard")
    assert (shard.partition, shard.constraint, shard.setup, shard.gpus_per_node) == (
        "cpu",
        "avx512",
        ["module load vips"],
        0,
    )
    assert shard.cpus_per_task == 2 and shard.tasks_per_node == 1 and shard.python is None
    predict = cluster_resources(parsed("--resources", str(experiment), "--partition", "gpu"), "predict")
    assert (predict.partition, predict.gpus_per_node, predict.python) == ("gpu", 1, "conda run -n hpcd python")
    assert predict.sbatch == {"exclusive": True} and predict.constraint == "avx512"
    block = tmp_path / "site.yaml"
    block.write_text(yaml.safe_dump({"qos": "long", "mem_gb": 32, "python": sys.executable}))
    site = cluster_resources(parsed("--resources", str(block), "--mem-gb", "8"), "shard")
    assert (site.qos, site.mem_gb, site.python) == ("long", 8.0, sys.executable)
    block.write_text(yaml.safe_dump({"mem_gb": "lots"}))
    with pytest.raises(HpcdistillError, match=r"site.yaml: resources.shard.mem_gb"):
        cluster_resources(parsed("--resources", str(block)), "shard")
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions}
    assert {"resources", "python"} <= flags


def test_local_array_tasks_run_through_the_interpreter_given(tiny_dataset, tiny_teacher, tmp_path):
    """--python: each task's process is started by the command given (here a wrapper standing in for a container)
    and the results are those of this interpreter."""
    from hpcdistill.cli import main

    wrapper = tmp_path / "container-python"
    wrapper.write_text(f'#!/bin/sh\necho started >> {tmp_path / "wrapper.log"}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    slides = [str(s) for s in tiny_dataset["slides"][:3]]
    argv = ["predict", str(tiny_teacher), *slides, "--out", str(tmp_path / "pred"), "--no-progress"]
    assert main.main([*argv, "--cluster", "local", "--tasks", "2", "--python", str(wrapper)]) == 0
    assert (tmp_path / "wrapper.log").read_text().split() == ["started"] * 3  # two tasks and the merge
    assert (tmp_path / "pred" / "predictions.json").is_file()
