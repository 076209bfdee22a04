"""Faults a cluster user meets, each through the real CLI or engine on real shards made by the sharder: a resume with
a changed config, a diverging run, a model that outputs NaN, truncated shards, an empty auxiliary set. Each either
carries on as the user said or stops with one line naming the file or key (exit status 2)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import cfg_for, tiny_train_overrides
from train_helpers import error_line, scalars

from hpcdistill.cli import main
from hpcdistill.common.errors import HpcdistillError
from hpcdistill.common.folder_lock import LOCK
from hpcdistill.config.loading import load_config
from hpcdistill.train import loop
from hpcdistill.train.run_folder import MODEL_STATES, complete_checkpoints

STEPS = ("train.checkpoint_every_steps=1", "data.epoch_samples=12")  # 6 optimizer steps, a checkpoint after each


def module_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint / MODEL_STATES, map_location="cpu", weights_only=True)["module"]


# ---------------------------------------------------------------------------------------------- resume


def test_resume_applies_a_changed_lr_and_refuses_a_changed_model(tiny_dataset, tmp_path, capsys):
    config = cfg_for(tiny_dataset, tmp_path, "tweak", "baseline", 2.5, *STEPS).save(tmp_path / "tweak.yaml")
    run_dir = tmp_path / "tweak"
    assert main.main(["train", str(config), "train.max_steps=2"]) == 0
    stored = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    # a change the checkpoint cannot take: one line naming the key, how to start a new run, nothing rewritten
    assert main.main(["train", str(config), "model.width=16"]) == 2
    line = error_line(capsys)
    assert "model.width: 8 -> 16" in line and "run.name=tweak-2" in line
    assert (run_dir / "config.yaml").read_text() == stored
    # a change it can take: the optimizer really uses the new lr from the next step on, and TensorBoard shows it
    assert main.main(["train", str(config), "train.lr=0.5", "train.max_steps=3"]) == 0
    err = capsys.readouterr().err
    assert (
        f"hpcdistill: resuming from {run_dir / 'checkpoints' / 'step000000002'} (step 2, epoch 0, micro-batch 4 "
        "of the epoch); changed on resume: train.lr: 0.001 -> 0.5, train.max_steps: 2 -> 3"
    ) in err
    assert "lr: 0.5" in (run_dir / "config.yaml").read_text()
    before, after = (module_weights(run_dir / "checkpoints" / f"step00000000{s}") for s in (2, 3))
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved > 0.05  # Adam moves a weight by about lr per step: at most ~0.003 with the old lr of 0.001
    lr = scalars(run_dir / "tb", "lr")
    assert lr[1] == lr[2] == pytest.approx(1e-3) and lr[3] == pytest.approx(0.5)
    stored = torch.load(run_dir / "checkpoints" / "step000000003" / MODEL_STATES, weights_only=True)["config"]
    assert stored["train"]["lr"] == 0.5  # the resolved config travels inside every checkpoint
    # the same shards copied elsewhere (node-local scratch) are the same data: their manifest is byte-identical
    moved = tmp_path / "scratch" / "shards"
    shutil.copytree(tiny_dataset["shards"], moved)
    assert main.main(["train", str(config), "train.lr=0.5", "train.max_steps=4", f"data.shards={moved}"]) == 0
    assert f"data.shards: {tiny_dataset['shards']} -> {moved}" in capsys.readouterr().err


def test_resume_from_an_older_checkpoint_supersedes_the_newer_ones(tiny_dataset, tmp_path, capsys):
    ckpts = tmp_path / "old" / "checkpoints"
    loop.run(cfg_for(tiny_dataset, tmp_path, "old", "baseline", 2.5, *STEPS, "train.max_steps=4"))
    loop.run(
        cfg_for(
            tiny_dataset,
            tmp_path,
            "old",
            "baseline",
            2.5,
            *STEPS,
            "train.max_steps=3",
            f"run.resume={ckpts / 'step000000002'}",
        )
    )
    assert (ckpts / "step000000004.superseded" / "SUPERSEDED").is_file()
    capsys.readouterr()
    rest = loop.run(cfg_for(tiny_dataset, tmp_path, "old", "baseline", 2.5, *STEPS))  # e.g. a requeue
    assert f"resuming from {ckpts / 'step000000003'} (step 3," in capsys.readouterr().err  # not the abandoned step 4
    assert rest["global_step"] == 6


# ---------------------------------------------------------------------------------------------- divergence


def test_divergence_from_the_start_sets_its_checkpoint_aside_and_a_lower_lr_reruns(tiny_dataset, tmp_path, capsys):
    config = cfg_for(tiny_dataset, tmp_path, "nan", "baseline", 2.5, *STEPS).save(tmp_path / "nan.yaml")
    ckpts = tmp_path / "nan" / "checkpoints"
    assert main.main(["train", str(config), "train.lr=1e30"]) == 2
    line = error_line(capsys)
    assert " step 2 (epoch 0): loss is " in line
    assert "Last good checkpoint: none; set aside as diverged: step000000001.diverged" in line
    assert not complete_checkpoints(ckpts) and (ckpts / "step000000001.diverged" / "DIVERGED").is_file()
    assert main.main(["train", str(config), "train.lr=1e-3"]) == 0  # the same command, a sane lr: no manual step
    assert [p.name for p in complete_checkpoints(ckpts)][-1] == "step000000006"
    assert (tmp_path / "nan" / "last.pt").is_file()


def test_divergence_names_the_newest_good_checkpoint_and_the_rerun_resumes_from_it(tiny_dataset, tmp_path):
    ckpts = tmp_path / "div" / "checkpoints"
    loop.run(cfg_for(tiny_dataset, tmp_path, "div", "baseline", 2.5, *STEPS, "train.max_steps=2"))
    good = ckpts / "step000000002"
    with pytest.raises(HpcdistillError) as err:  # step 3 writes weights near 1e30; step 4's loss is not finite
        loop.run(cfg_for(tiny_dataset, tmp_path, "div", "baseline", 2.5, *STEPS, "train.lr=1e30"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("step 4 (epoch 0): loss is ")
    assert f"Last good checkpoint: {good}; set aside as diverged: step000000003.diverged." in message
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step000000001", "step000000002"]
    rest = loop.run(cfg_for(tiny_dataset, tmp_path, "div", "baseline", 2.5, *STEPS))
    assert rest["global_step"] == 6 and not rest["stopped_early"]
    after = torch.load(rest["last_path"], weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in after.values())


def test_outputs_that_diverge_in_validation_stop_before_any_export(tiny_dataset, tmp_path):
    # one step per epoch: the update at step 1 is finite to compute but leaves weights near 1e30
    cfg = cfg_for(tiny_dataset, tmp_path, "val", "baseline", 2.5, "data.epoch_samples=2", "train.lr=1e30")
    with pytest.raises(HpcdistillError) as err:
        loop.run(cfg)
    message = str(err.value)
    assert message.startswith("validation after step 1 (epoch 0): outputs are not finite on ")
    assert "Last good checkpoint: none" in message
    assert not (tmp_path / "val" / "best.pt").exists()  # an argmax of NaN would have been scored as class 0


# ---------------------------------------------------------------------------------------------- NaN models


def test_evaluate_and_predict_refuse_a_model_whose_outputs_are_not_finite(tiny_dataset, tiny_teacher, tmp_path, capsys):
    blob = torch.load(tiny_teacher, weights_only=True)
    blob["state_dict"]["fc.bias"][1] = float("nan")
    broken = tmp_path / "broken.pt"
    torch.save(blob, broken)
    out = tmp_path / "eval"
    assert (
        main.main(
            [
                "evaluate",
                str(broken),
                "--shards",
                str(tiny_dataset["shards"]),
                "--split",
                "test",
                "--iterations",
                "10",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    line = error_line(capsys)
    assert line.startswith(f"hpcdistill: error: {broken}: the model's outputs are not finite on ")
    assert "(split 'test')" in line and not [p.name for p in out.iterdir() if not p.name.startswith(".hpcdistill")]
    slide = sorted(Path(p) for p in tiny_dataset["slides"])[0]
    assert main.main(["predict", str(broken), str(slide), "--out", str(tmp_path / "pred")]) == 2
    assert error_line(capsys).startswith(
        f"hpcdistill: error: {broken}: the model's outputs are not finite on {slide} tissue 0"
    )
    assert not [p.name for p in (tmp_path / "pred").glob("*.*") if p.name != LOCK]  # no class written for any slide


# ---------------------------------------------------------------------------------------------- bad shards


def copy_shards(tiny_dataset: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(tiny_dataset["shards"], copy)
    return copy


def cut(tar: Path, at: int) -> None:
    tar.write_bytes(tar.read_bytes()[:at])


def forget_file_sizes(shards: Path) -> None:
    """The manifest as sharders before the size record wrote it: only the reader can then find a cut shard."""
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["files"]
    (shards / "manifest.json").write_text(json.dumps(manifest))


def member_offset(tar: Path, index: int) -> int:
    """Where member `index`'s header starts: a cut there ends the file cleanly between two members."""
    with tarfile.open(tar) as archive:
        return archive.getmembers()[index].offset


@pytest.mark.parametrize("sampler, workers", [("resampled", 0), ("ordered", 2)])
def test_truncated_train_shard_is_one_line_naming_it(tiny_dataset, tmp_path, capsys, sampler, workers):
    shards = copy_shards(tiny_dataset, tmp_path)
    tar = shards / "train-000000.tar"
    cut(tar, tar.stat().st_size // 2)
    cfg = load_config(
        None,
        tiny_train_overrides(shards, tmp_path, "cut", "baseline", 2.5)
        + [f"data.sampler={sampler}", f"data.num_workers={workers}"],
    )
    assert main.main(["train", str(cfg.save(tmp_path / "cut.yaml"))]) == 2  # the manifest's size record sees it first
    assert error_line(capsys) == (
        f"hpcdistill: error: {tar}: {tar.stat().st_size} bytes, the manifest recorded {2 * tar.stat().st_size}: "
        "replaced or cut short since it was written; reshard"
    )
    forget_file_sizes(shards)
    assert main.main(["train", str(cfg.save(tmp_path / "cut.yaml"))]) == 2
    line = error_line(capsys)  # from a loader worker too: one line, not the worker's traceback
    assert (
        line.startswith(
            f"hpcdistill: error: {tar}: truncated or corrupt shard (unexpected end of data); last good sample: "
        )
        and "last good sample: none" not in line
    )


def test_shard_cut_between_members_is_not_read_as_a_shorter_one(tiny_dataset, tiny_teacher, tmp_path, capsys):
    shards = copy_shards(tiny_dataset, tmp_path)
    forget_file_sizes(shards)  # the reader's own check: a folder older than the manifest's size record
    val, test = shards / "val-000000.tar", shards / "test-000000.tar"
    at = member_offset(val, 10)
    cut(val, at)  # exactly after the second sample: tarfile alone would just stop there, as if the shard were shorter
    cfg = load_config(None, tiny_train_overrides(shards, tmp_path, "cutval", "baseline", 2.5))
    assert main.main(["train", str(cfg.save(tmp_path / "cutval.yaml"))]) == 2  # fails in validation
    # the last sample before the cut may have lost members, so the last good one is the sample before it
    first = tarfile.open(tiny_dataset["shards"] / "val-000000.tar").getmembers()[0].name.split(".")[0]
    assert error_line(capsys) == (
        f"hpcdistill: error: {val}: truncated or corrupt shard ({at} bytes, "
        f"no end-of-archive marker); last good sample: {first}. Restore the file, or shard "
        "the slides again into a new folder"
    )
    cut(test, member_offset(test, 7))  # inside the second sample: its remaining members are missing
    assert main.main(["evaluate", str(tiny_teacher), "--shards", str(shards), "--out", str(tmp_path / "eval")]) == 2
    assert error_line(capsys).startswith(f"hpcdistill: error: {test}: truncated or corrupt shard (")


def test_distill_with_an_empty_aux_set_is_an_error_naming_it(tiny_dataset, tiny_teacher, tmp_path):
    from hpcdistill.shards.writer import _OpenShard

    shards = copy_shards(tiny_dataset, tmp_path)
    _OpenShard(shards, "aux9", 0).commit()  # the sharder's own writer, given no samples
    cfg = cfg_for(
        {"shards": shards},
        tmp_path,
        "kd",
        "distill",
        2.5,
        f"teacher.checkpoint={tiny_teacher}",
        "data.aux=[aux1,aux9-000000.tar]",
    )
    with pytest.raises(HpcdistillError, match=r"^data.aux: the set 'aux9-000000.tar' in \S+ holds no samples"):
        loop.run(cfg)


def test_a_teacher_with_another_class_order_is_refused(tiny_dataset, tiny_teacher, tmp_path, capfd):
    """The same class names in another order would send every soft target to the wrong class."""
    blob = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    blob["classes"] = list(reversed(blob["classes"]))
    shuffled = tmp_path / "teacher-reordered.pt"
    torch.save(blob, shuffled)
    overrides = tiny_train_overrides(tiny_dataset["shards"], tmp_path, "kd", "distill", 2.5)
    config = load_config(None, [*overrides, f"teacher.checkpoint={shuffled}", "data.aux=[aux1]"]).save(
        tmp_path / "kd.yaml"
    )
    assert main.main(["train", str(config)]) == 2
    (line,) = [ln for ln in capfd.readouterr().err.splitlines() if "teacher.checkpoint" in ln]
    assert "(the same names in another order)" in line and ", ".join(reversed(blob["classes"])) in line
    assert not (tmp_path / "kd" / "best.pt").exists()
