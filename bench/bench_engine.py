"""DeepSpeed engine step vs a plain torch loop (same model, inputs, Adam), and images/s per magnification.

    OMP_NUM_THREADS=2 DS_ACCELERATOR=cpu python bench/bench_engine.py [--arch resnet18 --width 32 --size 256]

Both loops run side by side in one process, alternating rounds, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(key, value)

from hpcdistill.models.resnet import build_model  # noqa: E402
from hpcdistill.train.build import skip_single_rank_allreduce  # noqa: E402
from hpcdistill.train.distributed import setup_distributed  # noqa: E402


def ds_engine(model: torch.nn.Module, lr: float):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 1,
        "optimizer": {"type": "Adam", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    skip_single_rank_allreduce(engine, 1)  # as hpcdistill.train.loop sets it up
    return engine


def timed(step, x, y, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="10x input side in px; low mags are size*mag/10")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    setup_distributed()
    torch.manual_seed(0)
    model = build_model(args.arch, 3, width=args.width)
    plain_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.0)
    engine = ds_engine(model, 1e-3)

    def plain_step(x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x)[1], y).backward()
        opt.step()

    def engine_step(x, y):
        engine.backward(F.cross_entropy(engine(x)[1], y))
        engine.step()

    x, y = torch.randn(1, 3, args.size, args.size), torch.tensor([1])
    plain_step(x, y), engine_step(x, y)  # warm-up
    t_plain, t_engine = [], []
    for _ in range(args.rounds):
        t_plain.append(timed(plain_step, x, y, args.steps))
        t_engine.append(timed(engine_step, x, y, args.steps))
    tp, te = min(t_plain), min(t_engine)
    print(f"{args.arch} w{args.width} {args.size}px, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"plain torch step {tp * 1e3:8.1f} ms | deepspeed step {te * 1e3:8.1f} ms | "
        f"ratio {te / tp:.3f} (target <= 1.05)"
    )
    for mag in (10.0, 5.0, 2.5, 1.25, 0.625):
        side = max(8, round(args.size * mag / 10))
        x = torch.randn(1, 3, side, side)
        engine_step(x, y)
        t = min(timed(engine_step, x, y, args.steps) for _ in range(args.rounds))
        role = "teacher" if mag == 10 else "student"
        print(f"{role} @ {mag:g}x ({side}px): {1 / t:8.1f} images/s (train step)")


if __name__ == "__main__":
    main()
