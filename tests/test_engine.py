"""The DeepSpeed engine on real shards made by the sharder (conftest's `tiny_dataset`: synthetic slides at 10x,
2.5x and 1.25x; CPU, gloo): every mode, exact resume, 2 ranks for a plain and a distill run, TensorBoard."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, tiny_train_overrides

from hpcdistill.common.config import load_config
from hpcdistill.common.errors import HpcdistillError
from hpcdistill.shards.manifest import read_manifest
from hpcdistill.shards.reader import raw_samples, resolve_sets
from hpcdistill.train import loop, state
from hpcdistill.train.run_folder import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]


def samples(dataset: dict, *splits: str) -> int:
    return sum(dataset["manifest"]["splits"][s]["samples"] for s in splits)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_teacher_export_is_plain_weights(tiny_dataset, tiny_teacher):
    blob = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    manifest = tiny_dataset["manifest"]
    assert set(blob) == {"state_dict", "arch_kwargs", "mag", "classes", "config", "stats", "global_step", "windowing"}
    assert blob["mag"] == 10.0 and blob["classes"] == manifest["classes"]
    assert blob["stats"] == manifest["stats"]["10x"]  # standardisation travels with the weights
    # and so does the way the training shards cut tissues into windows, for prediction to cut alike
    assert blob["windowing"] == {"mags": manifest["params"]["mags"], "max_size": manifest["params"]["max_size"]}
    assert blob["windowing"]["mags"] == [10.0, 2.5, 1.25]
    assert blob["arch_kwargs"]["arch"] == "resnet10" and blob["config"]["train"]["mode"] == "teacher"
    assert (tiny_teacher.parent / "config.yaml").is_file() and (tiny_teacher.parent / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_teacher.parent / "tb"), size_guidance={"images": 0}).Reload()
    assert acc.Tags()["images"] == ["inputs/teacher_10x"]  # the teacher's own input, named as such


def test_distill_on_aux_sets_then_finetune_and_tensorboard(tiny_dataset, tiny_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = loop.run(
        cfg_for(
            tiny_dataset,
            tmp_path,
            "kd",
            "distill",
            2.5,
            f"teacher.checkpoint={tiny_teacher}",
            "data.aux=[aux1,aux2]",
            "log.images_every=4",
        )
    )
    assert summary["global_step"] == samples(tiny_dataset, "train", "aux1", "aux2") // 2  # ADv2 = aux1 + aux2 + train
    logged = EventAccumulator(str(tmp_path / "kd" / "tb"), size_guidance={"scalars": 0}).Reload()
    assert summary["select_metric"] == "loss"  # the distill default: best.pt has the lowest val distillation loss
    assert summary["best"] == pytest.approx(min(e.value for e in logged.Scalars("val/loss")), rel=1e-6)
    assert 0 <= summary["val"]["agreement"] <= 1 and summary["val"]["kl"] >= 0
    assert summary["val"]["samples"] == samples(tiny_dataset, "val")
    acc = EventAccumulator(str(tmp_path / "kd" / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {
        "loss/total",
        "loss/soft",
        "loss/pixel",
        "lr",
        "throughput/images_per_s",
        "val/agreement",
        "val/accuracy",
        "val/f1",
        "val/loss",
        "val/kl",
    } <= scalars
    assert {"inputs/teacher_10x", "inputs/student_2.5x"} <= set(acc.Tags()["images"])
    assert "config/text_summary" in acc.Tags()["tensors"]
    assert any(e.value > 0 for e in acc.Scalars("loss/pixel"))
    events = (tmp_path / "kd" / "tb").rglob("events.out.tfevents.*")
    assert any(b"hparams" in p.read_bytes() for p in events)
    # finetune the distilled student on labeled 2.5x train data: only the classifier moves
    init = Path(summary["best_path"])
    ft = loop.run(cfg_for(tiny_dataset, tmp_path, "ft", "finetune", 2.5, f"model.init={init}"))
    assert ft["global_step"] == samples(tiny_dataset, "train") // 2 and 0 <= ft["val"]["accuracy"] <= 1
    before, after = weights(init), weights(Path(ft["last_path"]))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"fc.weight", "fc.bias"}


def test_baseline_at_lowest_mag_bf16_and_fp16_rejected(tiny_dataset, tmp_path):
    summary = loop.run(cfg_for(tiny_dataset, tmp_path, "bl", "baseline", 1.25, "precision=bf16"))
    assert summary["global_step"] == samples(tiny_dataset, "train") // 2
    assert summary["val"]["samples"] == samples(tiny_dataset, "val") and 0 <= summary["val"]["accuracy"] <= 1
    blob = torch.load(summary["last_path"], map_location="cpu", weights_only=True)
    assert blob["mag"] == 1.25 and all(v.dtype == torch.float32 for v in blob["state_dict"].values())
    with pytest.raises(HpcdistillError, match="precision: fp16 is not supported on CPU"):
        loop.run(cfg_for(tiny_dataset, tmp_path, "fp16", "baseline", 2.5, "precision=fp16"))
    assert not complete_checkpoints(tmp_path / "fp16" / "checkpoints")  # refused before any training


def clean_env() -> dict[str, str]:
    """The environment for a child `hpcdistill` process: one thread, CPU DeepSpeed, and none of the rendezvous
    variables this pytest process set for its own process group (its MASTER_PORT is taken)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_kill_and_resume_is_bit_identical(tiny_dataset, tmp_path):
    extra = (
        "train.epochs=8",
        "train.checkpoint_every_steps=3",
        "train.keep_last=2",
        "data.sampler=resampled",
        "data.shuffle_buffer=3",
        "data.epoch_samples=12",
    )  # 6 steps per epoch, 48 in all
    full = loop.run(cfg_for(tiny_dataset, tmp_path, "full", "baseline", 2.5, *extra))
    # The same run as a `hpcdistill train` process, SIGKILLed right after its first mid-epoch checkpoint (step 3).
    cfg = cfg_for(tiny_dataset, tmp_path, "part", "baseline", 2.5, *extra)
    config = cfg.save(tmp_path / "part.yaml")
    ckpts = tmp_path / "part" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpcdistill.cli.main", "train", str(config)],
        env=clean_env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (first := complete_checkpoints(ckpts)) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert first[0].name == "step000000003"  # mid-epoch: the kill came after it, somewhere in steps 3..48
    assert not (tmp_path / "part" / "last.pt").exists()  # killed mid-run: nothing final was written
    (ckpts / "step999999999").mkdir()  # a save killed midway: no completion marker, must be ignored
    rest = loop.run(cfg)
    assert rest["global_step"] == full["global_step"] == 48
    a, b = weights(Path(full["last_path"])), weights(Path(rest["last_path"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rest["best"] == full["best"] and rest["best_step"] == full["best_step"]
    complete = [p.name for p in complete_checkpoints(ckpts)]
    assert len(complete) == 2 and complete[-1] == "step000000048"  # keep_last
    # A requeue that lands after the last step (the time-limit signal came during export) reruns a finished run:
    # it must load the final checkpoint and return the same result without training or exporting anything new.
    last_written = Path(rest["last_path"]).stat().st_mtime_ns
    again = loop.run(cfg)
    assert Path(again["last_path"]).stat().st_mtime_ns == last_written  # not re-exported
    assert again["global_step"] == 48 and not again["stopped_early"]
    assert again["best"] == rest["best"] and again["best_step"] == rest["best_step"]
    c = weights(Path(again["last_path"]))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [p.name for p in complete_checkpoints(ckpts)] == complete


def test_full_disk_at_a_checkpoint_is_one_line_and_resumable(tiny_dataset, tmp_path, monkeypatch):
    extra = ("train.checkpoint_every_steps=2", "data.epoch_samples=12")  # 6 steps
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):  # DeepSpeed writes its checkpoint files with torch.save
        if "step000000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg_for(tiny_dataset, tmp_path, "disk", "baseline", 2.5, *extra))
    ckpts = tmp_path / "disk" / "checkpoints"
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{ckpts / 'step000000004'}: checkpoint not saved (No space")
    assert f"{ckpts / 'step000000002'}, is intact" in message
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step000000002"]
    assert not (ckpts / "step000000004").exists()  # the half-written folder is gone: its space is given back
    monkeypatch.setattr(torch, "save", real_save)
    rest = loop.run(cfg_for(tiny_dataset, tmp_path, "disk", "baseline", 2.5, *extra))
    assert rest["global_step"] == 6 and not rest["stopped_early"]


class Payload:
    """Stands for any pickled object: loading it could run code, so a resume must refuse it."""


def test_resume_loads_checkpoints_weights_only(tiny_dataset, tmp_path):
    extra = ("train.checkpoint_every_steps=2", "data.epoch_samples=12", "train.max_steps=2")
    loop.run(cfg_for(tiny_dataset, tmp_path, "safe", "baseline", 2.5, *extra))
    (ckpt,) = complete_checkpoints(tmp_path / "safe" / "checkpoints")
    states = ckpt / "mp_rank_00_model_states.pt"
    blob = torch.load(states, weights_only=True)  # what the engine wrote is plain weights
    blob["payload"] = Payload()
    torch.save(blob, states)
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg_for(tiny_dataset, tmp_path, "safe", "baseline", 2.5, *extra[:2]))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"run.resume: {ckpt}: refused, it holds more than plain weights")


def test_nonfinite_input_stops_naming_the_sample_and_blames_no_checkpoint(tiny_dataset, tmp_path):
    # a copy of the real shards with corrupted stats: the sharder computes them from pixels, so it never writes
    # std 0 (-> inf inputs); that corruption is what this test is about
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset["shards"], bad)
    manifest = read_manifest(bad)
    manifest["stats"]["2.5x"]["std"] = [0.0] * 3
    (bad / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, tiny_train_overrides(bad, tmp_path, "nan", "baseline", 2.5))
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg)
    message = str(err.value)
    assert re.match(
        r"^step 1 \(epoch 0\): loss is nan on 1 rank\(s\): non-finite input image in sample (\S+) "
        r"\(check the manifest's mean/std and the shards\); stopped, no checkpoint was set aside$",
        message,
    )
    train_keys = {raw["__key__"] for raw in raw_samples(resolve_sets(bad, manifest, ["train"]).urls)}
    assert message.split(" in sample ")[1].split()[0] in train_keys  # the named sample is a real one
    assert not list((tmp_path / "nan").rglob("*.diverged")) and not (tmp_path / "nan" / "last.pt").exists()
    assert read_manifest(tiny_dataset["shards"])["stats"]["2.5x"]["std"] != [0.0] * 3  # the shared data is intact


def test_out_of_gpu_memory_names_the_tissue_and_its_size(tiny_dataset, tiny_teacher, tmp_path, monkeypatch):
    # Unit test of the error path (no GPU here): the real forward runs until the third micro-batch "does not fit".
    calls, real_forward = [], loop.forward_loss

    def forward_until_oom(state, batch):
        calls.append(batch["key"][0])
        if len(calls) == 5:  # grad_accum 2: step 3's first micro-batch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(state, batch)

    monkeypatch.setattr(loop, "forward_loss", forward_until_oom)
    cfg = cfg_for(
        tiny_dataset,
        tmp_path,
        "oom",
        "baseline",
        2.5,
        "train.checkpoint_every_steps=1",
        "train.grad_accum=2",
        "data.epoch_samples=12",
    )
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"step 3 (epoch 0): out of GPU memory on {calls[-1]} (")
    assert re.search(r"\(\d+x\d+ px at 2\.5x, micro-batch 1\); reshard with a smaller --max-size", message)
    assert message.endswith(str(tmp_path / "oom" / "checkpoints" / "step000000002"))
    calls.clear()  # distillation: the teacher's 10x input is usually the one that does not fit, so it is named too
    with pytest.raises(HpcdistillError, match=r"out of GPU memory on \S+ \(\d+x\d+ px at 2\.5x, \d+x\d+ px at 10x, "):
        loop.run(
            cfg_for(
                tiny_dataset,
                tmp_path,
                "oomkd",
                "distill",
                2.5,
                f"teacher.checkpoint={tiny_teacher}",
                "train.grad_accum=2",
                "data.epoch_samples=12",
            )
        )


RANK_SCRIPT = """
    import os, sys, torch
    from hpcdistill.train import loop
    from hpcdistill.train import state
    from hpcdistill.common.config import load_config
    # several runs in one launch, separated by "--": the process group is set up once and reused
    runs, args = [], []
    for arg in sys.argv[1:] + ["--"]:
        if arg == "--":
            runs.append(args)
            args = []
        else:
            args.append(arg)
    for overrides in runs:
        cfg = load_config(None, overrides)
        state = state.build_state(cfg)
        loop.fit(state)
        torch.save(state.engine.module.state_dict(), cfg.run_dir / f"rank{state.rank}.pt")
"""


@pytest.mark.slow
def test_two_ranks_match_one_rank_in_every_mode(tiny_dataset, tiny_teacher, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    # ordered sampler: optimizer step s sees the same global samples for any world size
    common = [
        "data.sampler=ordered",
        "model.arch=resnet10",
        "model.width=8",
        "model.groups=4",
        "train.epochs=1",
        "log.progress=false",
        f"data.shards={tiny_dataset['shards']}",
        "data.mag=2.5",
        "model.stem=lowres",
    ]
    # all four modes; finetune starts from the baseline this same launch exported (its FC layer only trains)
    runs = {
        "baseline": ["train.mode=baseline", "data.epoch_samples=20"],
        "distill": [
            "train.mode=distill",
            f"teacher.checkpoint={tiny_teacher}",
            "data.aux=[aux1,aux2]",
            "data.epoch_samples=32",
        ],
        "finetune": ["train.mode=finetune", "model.init={out}/baseline/best.pt", "data.epoch_samples=20"],
        # a checkpoint at every step by the clock: rank 0 decides for both ranks (a split decision would hang)
        "teacher": [
            "train.mode=teacher",
            "model.stem=standard",
            "data.epoch_samples=20",
            "train.checkpoint_every_min=1e-9",
            "train.keep_last=10",
        ],
    }

    def argv(out: Path, accum: int) -> list[str]:
        groups = [
            common
            + [e.format(out=out) for e in extra]
            + [f"run.out_dir={out}", f"run.name={mode}", f"train.grad_accum={accum}"]
            for mode, extra in runs.items()
        ]
        return [arg for group in groups for arg in group + ["--"]][:-1]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    two, one = tmp_path / "two", tmp_path / "one"
    with socket.socket() as sock:  # torchrun's --master_port=0 hangs DeepSpeed's shm comm setup: pass a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd + argv(two, 2), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, str(script)] + argv(one, 4), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in runs:
        r0, r1, single = (
            torch.load(p / mode / f"rank{r}.pt", weights_only=True) for p, r in ((two, 0), (two, 1), (one, 0))
        )
        assert all(torch.equal(r0[k], r1[k]) for k in r0), mode  # data parallel keeps the replicas identical
        for k in r0:  # same global batch, same samples: the same update up to summation order
            torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"{mode}: {k}")
        if mode == "teacher":  # 20 samples, global batch 4: 5 steps, each checkpointed (4 by time, 1 at epoch end)
            for out in (two, one):
                names = [p.name for p in complete_checkpoints(out / mode / "checkpoints")]
                assert names == [f"step{s:09d}" for s in range(1, 6)], names
        if mode == "finetune":
            start = torch.load(two / "baseline" / "best.pt", weights_only=True)["state_dict"]
            moved = {k for k in r0 if not torch.equal(r0[k], start[k])}
            assert moved == {"fc.weight", "fc.bias"}, moved  # everything but the FC layer stayed frozen
            continue
        overrides = common + [e.format(out=two) for e in runs[mode]]
        init = state.build_student(load_config(None, overrides), tiny_dataset["manifest"]["classes"])
        assert any(not torch.equal(r0[k], v) for k, v in init.state_dict().items()), mode  # it really trained


def test_first_train_outside_make_builds_no_op_and_warns_nothing(tiny_dataset, tmp_path):
    """The README's `source .venv/bin/activate` route: no DS_ACCELERATOR, an empty extensions cache. DeepSpeed would
    JIT-compile its CPU shm op (minutes, silently) and warn about the accelerator; neither may happen."""
    cfg = load_config(None, tiny_train_overrides(tiny_dataset["shards"], tmp_path, "first", "baseline", 2.5))
    env = clean_env()
    env.pop("DS_ACCELERATOR", None)
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path / "extensions")
    proc = subprocess.run(
        [sys.executable, "-m", "hpcdistill.cli.main", "train", str(cfg.save(tmp_path / "first.yaml"))],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "extensions").exists() and "built successfully" not in proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr[-2000:]
