"""`TrainTask`, the training job submitit runs: it maps submitit's JobEnvironment onto RANK/LOCAL_RANK/WORLD_SIZE/
MASTER_ADDR/MASTER_PORT and calls the loop's `run`, which knows nothing of SLURM. Its `checkpoint()` only resubmits
itself: the loop resumes from its latest complete checkpoint (run.resume=auto), so on timeout or preemption only the
work since that checkpoint is repeated. Imported by the launcher, so torch and DeepSpeed load only when it runs."""

from __future__ import annotations

import os
from typing import Any

from hpcdistill.cluster.resubmitting import Resubmitting, master_port
from hpcdistill.config.loading import load_config


class TrainTask(Resubmitting):
    """`loop.run(load_config(config, overrides))` with rank/world/master from submitit's JobEnvironment."""

    def __init__(self, config_path: str, overrides: list[str], cpus_per_task: int = 1) -> None:
        self.config_path = config_path
        self.overrides = list(overrides)
        self.cpus_per_task = cpus_per_task

    def run(self) -> dict[str, Any]:
        import submitit

        env = submitit.JobEnvironment()
        single_node = env.num_nodes == 1
        os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks))
        if env.num_tasks > 1:  # a rendezvous; one task needs none (an in-memory store: no port to collide on)
            os.environ.update(
                MASTER_ADDR="127.0.0.1" if single_node else env.hostnames[0],
                MASTER_PORT=str(master_port(env.raw_job_id)),
            )
        else:
            os.environ.pop("MASTER_PORT", None)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.cpus_per_task))
        from hpcdistill.train import loop  # lazy: the launcher process never imports torch/deepspeed
        from hpcdistill.train.run_folder import complete_checkpoints

        cfg = load_config(self.config_path, self.overrides)
        found = complete_checkpoints(cfg.run_dir / "checkpoints")
        start = f"resuming from {found[-1]}" if found and cfg.run.resume == "auto" else "starting fresh"
        print(
            f"hpcdistill launch: {cfg.run_dir} rank {env.global_rank}/{env.num_tasks} on {env.hostname}: {start}",
            flush=True,
        )
        return loop.run(cfg)
