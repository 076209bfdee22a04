"""The process group and the training device: rank, world size and local rank from the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; torchrun and the SLURM launcher set them), and the collectives
the engine and the run folder need outside DeepSpeed."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from hpcdistill.common.files import atomic_write_json


def setup_distributed() -> tuple[int, int, int]:
    """Init the process group from env vars (defaults make a single process work); returns (rank, world, local)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    world = int(os.environ["WORLD_SIZE"])
    alone = world == 1 and "MASTER_PORT" not in os.environ and not torch.distributed.is_initialized()
    if world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # several ranks on one node oversubscribe the cores otherwise (50x slower seen)
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # what DeepSpeed would pick, without its "unable to detect" warning
    import deepspeed

    skip_shm_comm_build()
    if alone:  # one process: an in-memory store, no port to race for (a free port picked, then taken by another run)
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ["LOCAL_RANK"])


def skip_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory C++ op at init (about 2 minutes on first use,
    into ~/.cache/torch_extensions). It serves only DeepSpeed's own inference all-reduce; training here reduces
    through torch.distributed (gloo on CPU), so mark the op as unavailable and DeepSpeed falls back without it."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            return
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except (ImportError, AttributeError, TypeError):  # another DeepSpeed layout: it builds the op as before
        pass


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one tiny all-reduce on the training device: NCCL reduces no
    CPU tensors). Lets all ranks take the same branch, so none is left waiting in a collective."""
    value = torch.tensor([float(flag)], device=device)
    if world_size() > 1:
        torch.distributed.all_reduce(value)
    return bool(value.item())


def device_for(local_rank: int) -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    accel.set_device(local_rank)
    return torch.device(accel.device_name(local_rank))


def record_ranks(run_dir: Path, rank: int, world: int, local: int) -> list[dict[str, Any]]:
    """Where every rank runs: each writes `<run>/ranks/rank<N>.json` (host, rank, local rank, world size, SLURM node
    and job, pid, when) at every start, and all ranks get the list (rank 0 shows it in TensorBoard)."""
    record = {
        "host": socket.gethostname(),
        "rank": rank,
        "local_rank": local,
        "world_size": world,
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "pid": os.getpid(),
        "started": time.time(),
    }
    (Path(run_dir) / "ranks").mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(run_dir) / "ranks" / f"rank{rank}.json", record, indent=1)
    records: list[Any] = [None] * world
    torch.distributed.all_gather_object(records, record)
    return records


def ranks_markdown(records: list[dict[str, Any]]) -> str:
    rows = [f"| {r['rank']} | {r['local_rank']} | {r['host']} | {r['world_size']} | {r['pid']} |" for r in records]
    return "\n".join(["| rank | local rank | host | world size | pid |", "|---|---|---|---|---|", *rows])
