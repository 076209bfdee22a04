"""Training throughput on the device, in one run: train-step images/s and achieved TFLOP/s as a fraction of a matmul
peak measured in the same run, per model and input size, with train.channels_last and train.compile off and on; the
DeepSpeed engine step against a plain torch step; and the real loader from real shards against batches already on
the device (does the loader starve the GPU?).

    python bench/bench_gpu.py [--out runs/bench-gpu --workers 8]     # on a GPU machine: bf16, ResNet-18, paper sizes
    python bench/bench_gpu.py --quick                                # CPU smoke run: small sizes, ResNet-10, fp32

FLOPs per step are 3x the forward's (torch.utils.flop_counter, convolutions and matmuls); the peak is an 8192^3
matmul in the training dtype (1024^3 with --quick). Writes <out>/gpu.json and <out>/gpu.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

for _key, _value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_env import describe  # noqa: E402

from hpcdistill.models.resnet import build_model  # noqa: E402
from hpcdistill.scoring.flops import forward_flops  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    side: int  # input height and width in px
    batch: int


def cases(quick: bool) -> list[Case]:
    """The 10x teacher on whole-tissue sizes at micro-batch 1 and bucketed, and the students at 2.5x and 1.25x."""
    s = 128 if quick else 768
    return [
        Case("teacher 10x", s, 1),
        Case("teacher 10x", 2 * s if quick else 2048, 1),
        Case("teacher 10x, bucketed", s, 4 if quick else 8),
        Case("student 2.5x", s // 4, 1),
        Case("student 1.25x", s // 8, 1),
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, rounds: int) -> float:
    """Median seconds per call over `rounds` rounds of `steps` calls."""
    times = []
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def matmul_peak(n: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of an n^3 matmul in `dtype`: the reference the training steps are a fraction of."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / timed(lambda: a @ b, device, steps=3, rounds=3)


def build(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, channels_last: bool, compile_: bool
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(args.arch, 3, width=args.width).to(device, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_:
        model.compile(dynamic=True)
    return model


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[1].float(), y).backward()
        opt.step()

    return step


def train_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, peak: float) -> list[dict]:
    rows = []
    options = [(False, False), (True, False)] + ([(False, True), (True, True)] if args.compile else [])
    for case in cases(args.quick):
        flops = 3 * case.batch * forward_flops(build_model(args.arch, 3, width=args.width), (case.side, case.side))
        for channels_last, compile_ in options:
            model = build(args, device, dtype, channels_last, compile_)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            x = torch.randn(case.batch, 3, case.side, case.side, device=device, dtype=dtype).contiguous(
                memory_format=fmt
            )
            y = torch.zeros(case.batch, dtype=torch.long, device=device)
            step = step_fn(model, x, y)
            step(), step()  # warm-up (and compilation)
            seconds = timed(step, device, args.steps, args.rounds)
            rows.append(
                {
                    "case": case.name,
                    "px": case.side,
                    "batch": case.batch,
                    "channels_last": channels_last,
                    "compile": compile_,
                    "images_s": case.batch / seconds,
                    "tflops": flops / seconds / 1e12,
                    "of_peak": flops / seconds / peak,
                }
            )
    return rows


def engine_ratio(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The DeepSpeed engine's train step over a plain torch step, same model and input, in the training dtype."""
    import deepspeed

    from hpcdistill.train.build import skip_single_rank_allreduce
    from hpcdistill.train.distributed import setup_distributed

    setup_distributed()
    side = 128 if args.quick else 768
    plain = build(args, device, dtype, False, False)
    torch.manual_seed(0)
    model = build_model(args.arch, 3, width=args.width).to(device)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "bf16": {"enabled": dtype == torch.bfloat16},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    skip_single_rank_allreduce(engine, 1)
    x = torch.randn(1, 3, side, side, device=device, dtype=dtype)
    y = torch.zeros(1, dtype=torch.long, device=device)

    def engine_step() -> None:
        engine.backward(F.cross_entropy(engine(x)[1].float(), y))
        engine.step()

    torch_step = step_fn(plain, x, y)
    torch_step(), engine_step()
    t_torch, t_engine = [], []
    for _ in range(args.rounds):  # alternating, so drift hits both alike
        t_torch.append(timed(torch_step, device, args.steps, 1))
        t_engine.append(timed(engine_step, device, args.steps, 1))
    return {
        "px": side,
        "torch_ms": 1e3 * statistics.median(t_torch),
        "engine_ms": 1e3 * statistics.median(t_engine),
        "ratio": statistics.median(t_engine) / statistics.median(t_torch),
    }


def loader_ratios(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Teacher train steps at 10x fed by the real loader against the same batches already on the device (1.0: the
    loader keeps up), with JPEGs decoded by the CPU workers and, where torchvision loads, on the device (nvJPEG;
    on a CPU the encoded path with PIL, as a rehearsal)."""
    from gpu_check import write_data

    from hpcdistill.common.errors import TrainError
    from hpcdistill.config.schema import AugmentConfig
    from hpcdistill.data.device_batch import nvjpeg_decoder
    from hpcdistill.data.streams import StreamSpec
    from hpcdistill.shards.manifest import mag_stats, read_manifest
    from hpcdistill.shards.reader import resolve_sets

    shards = Path(args.shards) if args.shards else write_data(Path(args.out) / "data", args.quick)
    manifest = read_manifest(shards)
    spec = StreamSpec(
        urls=resolve_sets(shards, manifest, ["train"]).urls,
        mode="labeled",
        mag=10.0,
        teacher_mag=10.0,
        stats={"10x": mag_stats(manifest, 10.0)},
        micro_batch=1,
        samples=16 if args.quick else 256,
        sampler="ordered",
        augment=AugmentConfig(),
        finish_on_device=True,
    )
    rows = [loader_ratio(args, device, dtype, spec)]
    try:
        if device.type == "cuda":
            nvjpeg_decoder()
        rows.append(loader_ratio(args, device, dtype, dataclasses.replace(spec, decode_on_device=True)))
    except TrainError as err:
        rows.append({"decode": "gpu", "skipped": str(err)})
    return rows


def loader_ratio(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, spec) -> dict:
    from hpcdistill.data.device_batch import finish_batch
    from hpcdistill.data.streams import make_loader

    model = build(args, device, dtype, False, False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train(batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch["x"])[1].float(), batch["y"].to(device)).backward()
        opt.step()

    loader = make_loader(spec, args.workers, pin_memory=device.type == "cuda")
    resident = [finish_batch(b, device, dtype) for b in loader]
    train(resident[0])
    sync(device)
    start = time.perf_counter()
    for batch in resident:
        train(batch)
    sync(device)
    t_resident = time.perf_counter() - start
    start = time.perf_counter()
    for batch in make_loader(spec, args.workers, pin_memory=device.type == "cuda"):
        train(finish_batch(batch, device, dtype))
    sync(device)
    t_loader = time.perf_counter() - start
    where = (
        ("gpu (nvJPEG)" if device.type == "cuda" else "the device (CPU rehearsal: PIL)")
        if spec.decode_on_device
        else "cpu workers"
    )
    return {
        "samples": spec.samples,
        "workers": args.workers,
        "decode": where,
        "resident_s": t_resident,
        "loader_s": t_loader,
        "ratio": t_resident / t_loader,
    }


def decode_agreement(args: argparse.Namespace, device: torch.device) -> dict:
    """nvJPEG on the device against the loader's PIL decode of the same bytes: grey levels of difference."""
    from hpcdistill.common.errors import TrainError
    from hpcdistill.data.device_batch import nvjpeg_decoder
    from hpcdistill.shards.manifest import read_manifest
    from hpcdistill.shards.reader import decode_image, raw_samples, resolve_sets

    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    try:
        decode = nvjpeg_decoder()
    except TrainError as err:
        return {"skipped": str(err)}
    shards = Path(args.shards) if args.shards else Path(args.out) / "data" / "shards"
    blobs = [raw["10x.jpg"] for raw in raw_samples(resolve_sets(shards, read_manifest(shards), ["train"]).urls)][:64]
    on_device = decode([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs], device)
    diffs = [(img.cpu().permute(1, 2, 0).int() - decode_image(b).int()).abs() for img, b in zip(on_device, blobs)]
    return {
        "images": len(blobs),
        "max_abs": max(int(d.max()) for d in diffs),
        "mean_abs": statistics.fmean(float(d.float().mean()) for d in diffs),
        "identical": sum(int(d.max()) == 0 for d in diffs),
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['machine']}; {result['device']}, {result['dtype']}, {result['arch']} width {result['width']}; "
        f"matmul peak {result['peak_tflops']:.2f} TFLOP/s",
        "",
        "| case | px | batch | channels_last | compile | images/s | TFLOP/s | of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["train"]:
        lines.append(
            f"| {r['case']} | {r['px']} | {r['batch']} | {r['channels_last']} | {r['compile']} | "
            f"{r['images_s']:.1f} | {r['tflops']:.3f} | {100 * r['of_peak']:.1f}% |"
        )
    e = result["engine"]
    lines += [
        "",
        f"DeepSpeed step / torch step at {e['px']} px: {e['engine_ms']:.1f} / {e['torch_ms']:.1f} ms = "
        f"**{e['ratio']:.3f}** (target <= 1.05)",
    ]
    for ld in result["loader"]:
        lines.append(
            f"Loader-fed / device-resident teacher steps at 10x, decode on {ld['decode']}: "
            + (
                f"skipped ({ld['skipped']})"
                if "skipped" in ld
                else f"**{ld['ratio']:.3f}** ({ld['samples']} tissues, {ld['workers']} workers; target >= 0.9)"
            )
        )
    agree = result["decode_agreement"]
    lines.append(
        "nvJPEG vs the loader's PIL decode of the same 10x JPEGs: "
        + (
            f"skipped ({agree['skipped']})"
            if "skipped" in agree
            else f"max {agree['max_abs']}, mean {agree['mean_abs']:.3f} grey levels; "
            f"{agree['identical']}/{agree['images']} "
            "images identical"
        )
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small sizes, ResNet-10 width 16, fp32")
    ap.add_argument("--out", default="runs/bench-gpu")
    ap.add_argument("--shards", default="", help="real shards with 10x images (default: made under --out)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time train.compile (minutes of compiling on CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.arch, args.width = ("resnet10", 16) if args.quick else ("resnet18", 64)
    if args.quick:
        args.steps, args.rounds, args.workers = 2, 2, min(args.workers, 2)
    peak = matmul_peak(1024 if args.quick else 8192, device, dtype)
    result = {
        "machine": describe(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "arch": args.arch,
        "width": args.width,
        "peak_tflops": peak / 1e12,
        "train": train_rows(args, device, dtype, peak),
        "engine": engine_ratio(args, device, dtype),
        "loader": loader_ratios(args, device, dtype),
        "decode_agreement": decode_agreement(args, device),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    (out / "gpu.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
