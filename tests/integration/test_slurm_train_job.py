"""`hpcdistill train` as a plain sbatch job on the real local SLURM (slurm/cluster.sh; root only, CI installs the
packages), on shards cut by the real sharder (conftest's `small_dataset`). The cluster's own behaviour is checked
apart from the product, by slurm/selftest (`bash slurm/cluster.sh selftest`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sacct_wait_final, tiny_train_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(200)
def sbatch(*args: str, env: dict[str, str]) -> int:
    out = subprocess.run(
        ["sbatch", "--parsable", *args], check=True, text=True, capture_output=True, timeout=30, env=env
    )
    return int(out.stdout.strip().split(";")[0])


@pytest.mark.timeout(200)
def test_sbatch_job_trains_on_real_shards(slurm_cluster, small_dataset, tmp_path):
    """`hpcdistill train` as a plain batch job (no submitit, no launcher) on the sharder's real shards: the package
    runs in SLURM's job environment, and its run folder and summary are what an interactive run writes."""
    from hpcdistill.config.loading import load_config
    from hpcdistill.data.streams import per_rank_samples

    cfg = load_config(None, tiny_train_overrides(small_dataset["shards"], tmp_path, "job", "baseline", 2.5))
    config = cfg.save(tmp_path / "job.yaml")
    # sbatch passes this environment on: none of the rendezvous variables an in-process run may have set here
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    job = sbatch(
        f"--chdir={REPO}",
        f"--output={out}",
        f"--error={err}",
        "--cpus-per-task=1",
        "--time=5",
        "--wrap",
        f"{sys.executable} -m hpcdistill train {config}",
        env=env,
    )
    state = sacct_wait_final(job, 180)[-1]
    assert state == ("COMPLETED", "0:0"), err.read_text()[-3000:]
    text = out.read_text()
    summary = json.loads(text[text.rindex('{\n  "run_dir"') :])  # the summary `hpcdistill train` prints last
    train = small_dataset["manifest"]["splits"]["train"]["samples"]
    steps = per_rank_samples(train, 1, cfg.train.grad_accum) // cfg.train.grad_accum
    assert summary["run_dir"] == str(tmp_path / "job") and summary["global_step"] == steps and steps > 0
    assert summary["val"]["samples"] == small_dataset["manifest"]["splits"]["val"]["samples"]
    blob = torch.load(tmp_path / "job" / "last.pt", map_location="cpu", weights_only=True)
    assert blob["mag"] == 2.5 and blob["global_step"] == steps and (tmp_path / "job" / "best.pt").is_file()
