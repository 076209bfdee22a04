"""Training runs on the real sharder's tiny shards: exports are plain weights, distillation and fine-tuning, refused
precisions, a full disk at a checkpoint, weights-only resume loads, non-finite inputs, out-of-memory lines."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, tiny_train_overrides
from train_helpers import Payload, clean_env, samples, weights

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.config.loading import load_config
from hpcdistill.shards.manifest import read_manifest
from hpcdistill.shards.reader import raw_samples, resolve_sets
from hpcdistill.train import loop
from hpcdistill.train.run_folder import complete_checkpoints

REPO = Path(__file__).resolve().parents[3]


def test_teacher_export_is_plain_weights(tiny_dataset, tiny_teacher):
    blob = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    manifest = tiny_dataset["manifest"]
    keys = {"state_dict", "arch_kwargs", "mag", "classes", "config", "stats", "global_step", "windowing", "source"}
    assert set(blob) == keys | {"val", "seen", "provenance", "mag_scale", "stain_norm"} and blob["source"] == "level0"
    # what the shards' magnifications and colours meant, for predict and evaluate to read slides alike
    assert blob["mag_scale"] == {"basis": "mpp", "mpp_at_10x": 1.0} and blob["stain_norm"]["method"] == "none"
    own = {s for s, v in manifest["slides"].items() if v["split"] != "test" and v["status"] == "ok"}
    assert set(blob["seen"]["slides"]) == own  # the slides a score on them would not be a test of
    assert 0 <= blob["val"]["accuracy"] <= 1 and blob["val"]["samples"] == samples(tiny_dataset, "val")  # the gate's
    assert blob["mag"] == 10.0 and blob["classes"] == manifest["classes"]
    assert blob["stats"] == manifest["stats"]["10x"]  # standardisation travels with the weights
    # and so does the way the training shards cut tissues into windows, for prediction to cut alike
    assert blob["windowing"] == {"mags": manifest["params"]["mags"], "max_size": manifest["params"]["max_size"]}
    assert blob["windowing"]["mags"] == [10.0, 2.5, 1.25]
    assert blob["arch_kwargs"]["arch"] == "resnet10" and blob["config"]["train"]["mode"] == "teacher"
    assert (tiny_teacher.parent / "config.yaml").is_file() and (tiny_teacher.parent / "last.pt").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_teacher.parent / "tb"), size_guidance={"images": 0}).Reload()
    # the teacher's own input, named as such, and the validation confusion matrix with per-class scalars
    assert acc.Tags()["images"] == ["inputs/teacher_10x", "val/confusion"]
    classes = manifest["classes"]
    assert {f"val_class/recall/{c}" for c in classes} <= set(acc.Tags()["scalars"])
    confusion = acc.Images("val/confusion")[-1]
    from hpcdistill.train.class_logging import confusion_image

    expected = confusion_image([[0] * len(classes)] * len(classes), classes).shape  # the labelled image's size
    assert (confusion.height, confusion.width) == expected[:2]
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert {"method", "aux", "seed", "ema_decay"} <= set(start.hparams)  # what tells KD, KD (ADv1), KD (ADv2) apart
    assert start.hparams["method"].string_value == "Teacher" and start.hparams["aux"].string_value == "none"


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
    # an epoch is one pass over the labelled train tissues: the aux sets (ADv2 = aux1 + aux2) add variety, not steps
    assert summary["global_step"] == samples(tiny_dataset, "train") // 2
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


# torch's serializer reports a full disk as its zip writer's RuntimeError, the OS as an OSError: both are one line
FULL_DISK = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError(
        "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: file write failed"
    ),
]


@pytest.mark.parametrize("fault", FULL_DISK, ids=["oserror", "torch-runtimeerror"])
def test_full_disk_at_a_checkpoint_is_one_line_and_resumable(tiny_dataset, tmp_path, monkeypatch, fault):
    extra = ("train.checkpoint_every_steps=2", "data.epoch_samples=12")  # 6 steps
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):  # DeepSpeed writes its checkpoint files with torch.save
        if "step000000004" in str(f):
            raise fault
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg_for(tiny_dataset, tmp_path, "disk", "baseline", 2.5, *extra))
    ckpts = tmp_path / "disk" / "checkpoints"
    message = str(err.value)
    reason = "No space" if isinstance(fault, OSError) else "[enforce fail at inline_container.cc:858]"
    assert "\n" not in message and message.startswith(f"{ckpts / 'step000000004'}: checkpoint not saved ({reason}")
    assert f"{ckpts / 'step000000002'}, is intact" in message
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step000000002"]
    assert not (ckpts / "step000000004").exists()  # the half-written folder is gone: its space is given back
    monkeypatch.setattr(torch, "save", real_save)
    rest = loop.run(cfg_for(tiny_dataset, tmp_path, "disk", "baseline", 2.5, *extra))
    assert rest["global_step"] == 6 and not rest["stopped_early"]


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
