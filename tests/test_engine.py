"""The DeepSpeed engine on tiny real shards (CPU, gloo): every mode, exact resume, 2 ranks, TensorBoard."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

from hpcdistill import engine  # noqa: E402
from hpcdistill.config import load_config  # noqa: E402
from hpcdistill.errors import HpcdistillError  # noqa: E402
from test_data import write_tiny_shards  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 16x16 at 10x, 4x4 at 2.5x; shards of unequal size
    return write_tiny_shards(tmp_path_factory.mktemp("shards"), {"train": [7, 5], "val": [5], "aux": [6]},
                             low_size=(4, 4), labeled=("train", "val"))


def cfg_for(shards: Path, out: Path, name: str, mode: str, *extra: str):
    base = [
        f"run.out_dir={out}", f"run.name={name}", f"data.shards={shards}", "data.sampler=ordered",
        "model.arch=resnet10", "model.width=8", "model.groups=4", "train.epochs=2", "train.grad_accum=2",
        "train.micro_batch=1", f"train.mode={mode}", "log.log_every=1", "log.progress=false",
        "deepspeed=configs/deepspeed/fp32.json", "model.stem=" + ("standard" if mode == "teacher" else "lowres"),
    ]
    return load_config(None, base + list(extra))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    summary = engine.run(cfg_for(shards, out, "teacher", "teacher"))
    assert summary["global_step"] == 2 * 6  # 12 samples / (1*2) per step, 2 epochs
    return Path(summary["best_path"])


def test_teacher_export_is_plain_weights(teacher):
    blob = torch.load(teacher, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "arch_kwargs", "mag", "classes", "config", "stats"}
    assert blob["mag"] == 10.0 and blob["classes"] == ["normal", "duodenitis", "celiac"]
    assert blob["arch_kwargs"]["arch"] == "resnet10" and blob["config"]["train"]["mode"] == "teacher"
    assert (teacher.parent / "config.yaml").is_file() and (teacher.parent / "last.pt").is_file()


def test_distill_then_finetune_and_tensorboard(shards, teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = engine.run(cfg_for(shards, tmp_path, "kd", "distill", f"teacher.checkpoint={teacher}",
                                 "data.aux=[aux]", "log.images_every=2"))
    assert summary["select_metric"] == "agreement" and 0 <= summary["val"]["agreement"] <= 1
    assert summary["global_step"] == 2 * 9  # train + aux = 18 samples, 2 per step
    acc = EventAccumulator(str(tmp_path / "kd" / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/soft", "loss/pixel", "lr", "throughput/images_per_s", "val/agreement",
            "val/accuracy", "val/f1", "val/loss"} <= scalars
    assert {"inputs/teacher_10x", "inputs/student_2.5x"} <= set(acc.Tags()["images"])
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert any(e.value > 0 for e in acc.Scalars("loss/pixel"))
    hp = [p for p in (tmp_path / "kd" / "tb").rglob("events.out.tfevents.*")]
    assert any(b"hparams" in p.read_bytes() for p in hp)
    # finetune: only the classifier moves
    init = Path(summary["best_path"])
    ft = engine.run(cfg_for(shards, tmp_path, "ft", "finetune", f"model.init={init}", "train.epochs=1"))
    before, after = weights(init), weights(Path(ft["last_path"]))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}


def test_baseline_bf16_and_fp16_rejected(shards, tmp_path):
    summary = engine.run(cfg_for(shards, tmp_path, "bl", "baseline", "precision=bf16", "train.epochs=1"))
    assert summary["global_step"] == 6 and 0 <= summary["val"]["accuracy"] <= 1
    assert all(v.dtype == torch.float32 for v in weights(Path(summary["last_path"])).values())
    with pytest.raises(HpcdistillError, match="precision: fp16 is not supported on CPU"):
        engine.run(cfg_for(shards, tmp_path, "fp16", "baseline", "deepspeed=configs/deepspeed/fp16.json"))


def test_kill_and_resume_is_bit_identical(shards, tmp_path):
    extra = ("train.epochs=2", "train.checkpoint_every_steps=2", "train.keep_last=2", "data.sampler=resampled",
             "data.shuffle_buffer=3")
    full = engine.run(cfg_for(shards, tmp_path, "full", "baseline", *extra))
    part = engine.run(cfg_for(shards, tmp_path, "part", "baseline", *extra, "train.max_steps=8"))
    assert part["stopped_early"] and part["global_step"] == 8 and part["epoch"] == 1  # mid-epoch 2 of 2
    ckpts = tmp_path / "part" / "checkpoints"
    half = ckpts / "step999999999"  # a save killed midway: no completion marker, must be ignored
    half.mkdir()
    rest = engine.run(cfg_for(shards, tmp_path, "part", "baseline", *extra))
    assert rest["global_step"] == full["global_step"] == 12
    a, b = weights(Path(full["last_path"])), weights(Path(rest["last_path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest["best"] == full["best"] and rest["best_step"] == full["best_step"]
    complete = [p.name for p in engine.complete_checkpoints(ckpts)]
    assert len(complete) == 2 and complete[-1] == "step000000012"  # keep_last


def test_nonfinite_loss_stops_with_step_and_checkpoint(tmp_path):
    bad = write_tiny_shards(tmp_path / "bad", {"train": [4], "val": [2]}, low_size=(4, 4),
                            stats={"mean": [0.5] * 3, "std": [0.0] * 3})  # division by zero -> inf inputs
    with pytest.raises(HpcdistillError, match=r"step 1 \(epoch 0\): loss is nan.*Last good checkpoint: none"):
        engine.run(cfg_for(bad, tmp_path, "nan", "baseline"))


@pytest.mark.slow
def test_two_ranks_match_one_rank(shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from hpcdistill import engine
        from hpcdistill.config import load_config
        cfg = load_config(None, sys.argv[1:])
        state = engine.build_state(cfg)
        engine.fit(state)
        torch.save(state.engine.module.state_dict(), os.path.join(cfg.run.out_dir, f"rank{{state.rank}}.pt"))
    """))
    common = [f"data.shards={shards}", "data.sampler=ordered", "model.arch=resnet10", "model.width=8",
              "model.groups=4", "train.epochs=1", "train.micro_batch=1", "train.mode=baseline", "model.stem=lowres",
              "log.progress=false", "run.name=r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two, one = tmp_path / "two", tmp_path / "one"
    with socket.socket() as sock:  # torchrun's --master_port=0 hangs DeepSpeed's shm comm setup: pass a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd + common + [f"run.out_dir={two}", "train.grad_accum=2"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, str(script)] + common + [f"run.out_dir={one}", "train.grad_accum=4"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, single = (torch.load(p, weights_only=True) for p in (two / "rank0.pt", two / "rank1.pt", one / "rank0.pt"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # data parallel keeps the replicas identical
    for k in r0:  # same global batch, same samples: the same update up to summation order
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)
    init = engine.build_student(load_config(None, common[2:]), ["a", "b", "c"]).state_dict()
    assert any(not torch.equal(r0[k], init[k]) for k in r0)  # the run really trained
