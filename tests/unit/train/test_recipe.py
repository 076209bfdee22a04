"""The training recipe on the real engine and the real sharder's tiny shards: a cosine schedule resumed mid-warm-up
and mid-decay continues exactly, the budget follows the data, the stop rule says why a run ended, and the teacher
gate refuses a teacher that did not learn, through the real CLI."""

from __future__ import annotations

import pytest
import torch
from conftest import cfg_for
from train_helpers import error_line, samples, scalars, weights

from hpcdistill.cli import main
from hpcdistill.common.errors import ConfigError, HpcdistillError
from hpcdistill.config.loading import load_config
from hpcdistill.models.export import load_exported
from hpcdistill.train import loop
from hpcdistill.train.budget import stop_reason
from hpcdistill.train.data_plan import plan_data

# 2 epochs of 6 optimizer steps (12 samples, accumulation 2), one global sample order: a resume can be exact
COSINE = (
    "data.epoch_samples=12",
    "data.sampler=ordered",
    "train.epochs=2",
    "train.schedule=cosine",
    "train.warmup_fraction=0.25",
    "train.checkpoint_every_steps=1",
)


def test_a_cosine_schedule_resumed_mid_warmup_and_mid_decay_continues_exactly(tiny_dataset, tmp_path):
    whole = loop.run(cfg_for(tiny_dataset, tmp_path, "whole", "baseline", 2.5, *COSINE))
    for stop in ("train.max_steps=2", "train.max_steps=8", "train.max_steps=0"):  # in the warm-up, in the decay, end
        loop.run(cfg_for(tiny_dataset, tmp_path, "parts", "baseline", 2.5, *COSINE, stop))
    lr_whole, lr_parts = scalars(tmp_path / "whole" / "tb", "lr"), scalars(tmp_path / "parts" / "tb", "lr")
    assert sorted(lr_whole) == list(range(1, 13)) and lr_parts == lr_whole
    assert lr_whole[1] < lr_whole[3] and lr_whole[12] < lr_whole[6]  # it rises, then decays
    assert lr_whole[12] == pytest.approx(1e-3 * 0.01)  # to lr x min_lr_ratio
    a, b = weights(tmp_path / "whole" / "last.pt"), weights(tmp_path / "parts" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and whole["stop_reason"] == "budget: train.epochs done"


def test_a_changed_budget_under_a_schedule_is_refused_on_resume(tiny_dataset, tmp_path, capsys):
    config = cfg_for(tiny_dataset, tmp_path, "bent", "baseline", 2.5, *COSINE).save(tmp_path / "bent.yaml")
    assert main.main(["train", str(config), "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert main.main(["train", str(config), "train.epochs=4"]) == 2
    line = error_line(capsys)
    assert "train.epochs: 2 -> 4" in line and "bend the schedule" in line and "run.name=bent-2" in line


def test_a_warmup_before_a_constant_lr_rises_then_holds(tiny_dataset, tmp_path):
    constant = [o.replace("schedule=cosine", "schedule=constant") for o in COSINE]
    loop.run(cfg_for(tiny_dataset, tmp_path, "warm", "baseline", 2.5, *constant))
    lr = scalars(tmp_path / "warm" / "tb", "lr")  # logged after each step: the lr of the next
    assert [lr[s] for s in range(1, 13)] == pytest.approx([1e-3 / 3, 2e-3 / 3] + [1e-3] * 10)


def test_the_budget_follows_the_data_and_says_how(tiny_dataset, tmp_path):
    train = samples(tiny_dataset, "train")
    for passes in (1, 2.5):
        extra = (f"data.epoch_passes={passes}", "data.aux=[aux1]", "teacher.checkpoint=unused.pt")
        cfg = cfg_for(tiny_dataset, tmp_path, "b", "distill", 2.5, *extra)
        plan = plan_data(cfg, world=1)
        assert plan.per_rank == round(passes * train) // 2 * 2  # passes over the labelled tissues, not train + aux
        assert plan.steps_per_epoch == plan.per_rank // 2
        assert f"{passes:g} pass(es) over the {train} labelled train tissues of data.train" in plan.budget
        assert f"1 epochs x {plan.steps_per_epoch} optimizer steps = {plan.steps_per_epoch} steps" in plan.budget


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.epoch_passes=2", "data.epoch_samples=8"], "data.epoch_passes: sizes an epoch only when data.epoch_"),
        (["data.epoch_passes=0"], "data.epoch_passes: must be > 0, got 0"),
        (["train.max_epochs=2", "train.epochs=3", "train.patience=1"], "train.max_epochs: 2 is below train.epochs 3"),
        (["train.max_epochs=5", "train.epochs=3"], "train.max_epochs: an extension needs train.patience"),
        (["train.patience=2", "data.val=[]"], "train.patience: a plateau is seen on validation"),
        (["train.warmup_fraction=1"], "train.warmup_fraction: a fraction of the steps in [0, 1), got 1"),
        (["teacher.min_val_accuracy=90"], "teacher.min_val_accuracy: a fraction in [0, 1], got 90"),
        (["train.schedule=linear"], "train.schedule"),
    ],
)
def test_budget_settings_that_contradict_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_stop_rule_says_why_a_run_ends():
    cfg = load_config(None, ["train.epochs=4", "train.patience=2", "train.max_epochs=6"])
    assert stop_reason(cfg, 2, 2, 0.9, 10).startswith("plateau: no better val accuracy in 2 validations (best 0.9000")
    assert stop_reason(cfg, 4, 1, 0.9, 30) is None  # still improving at train.epochs: the extension goes on
    assert stop_reason(cfg, 6, 0, 0.9, 60) == "budget: max_epochs reached"
    plain = load_config(None, ["train.epochs=4"])
    assert stop_reason(plain, 3, 3, 0.5, 1) is None and stop_reason(plain, 4, 3, 0.5, 1) == "budget: train.epochs done"


def test_an_undertrained_teacher_is_refused_in_one_line_and_warn_goes_on(tiny_dataset, tiny_teacher, tmp_path, capsys):
    recorded = load_exported(tiny_teacher).val["accuracy"]  # one epoch on the tiny set: what the gate reads
    config = cfg_for(tiny_dataset, tmp_path, "kd", "distill", 2.5, f"teacher.checkpoint={tiny_teacher}")
    path = config.save(tmp_path / "kd.yaml")
    floor = "teacher.min_val_accuracy=0.99"
    assert main.main(["train", str(path), floor]) == 2
    line = error_line(capsys)
    assert f"{tiny_teacher} is not good enough to teach: its validation accuracy {recorded:.4f} is below " in line
    assert "teacher.min_val_accuracy 0.9900" in line and "teacher.gate=warn" in line
    assert not (tmp_path / "kd" / "checkpoints").exists()  # refused before training
    against = f"teacher.reference={tiny_teacher}"  # the reference scored as well: the teacher does not beat it
    assert main.main(["train", str(path), against]) == 2
    assert f"does not beat teacher.reference {tiny_teacher} ({recorded:.4f})" in error_line(capsys)
    assert main.main(["train", str(path), floor, "teacher.gate=warn", "train.max_steps=1"]) == 0
    assert "warning: teacher.checkpoint:" in capsys.readouterr().err


def test_a_teacher_export_without_a_validation_record_cannot_be_judged(tiny_dataset, tiny_teacher, tmp_path):
    blob = torch.load(tiny_teacher, weights_only=True)
    del blob["val"]
    old = tmp_path / "old-teacher.pt"
    torch.save(blob, old)
    judged = ("teacher.min_val_accuracy=0.5", f"teacher.checkpoint={old}")
    with pytest.raises(HpcdistillError, match="records no validation accuracy") as err:
        loop.run(cfg_for(tiny_dataset, tmp_path, "kd", "distill", 2.5, *judged))
    assert "\n" not in str(err.value)
    unjudged = loop.run(
        cfg_for(tiny_dataset, tmp_path, "kd0", "distill", 2.5, f"teacher.checkpoint={old}", "train.max_steps=1")
    )
    assert unjudged["global_step"] == 1  # no floor and no reference: nothing to judge, the old export teaches


def test_the_gate_may_change_on_resume_and_is_judged_again(tiny_dataset, tiny_teacher, tmp_path, capsys):
    config = cfg_for(tiny_dataset, tmp_path, "kd", "distill", 2.5, f"teacher.checkpoint={tiny_teacher}")
    path = config.save(tmp_path / "kd.yaml")
    assert main.main(["train", str(path), "train.max_steps=1"]) == 0
    assert main.main(["train", str(path), "train.max_steps=2", "teacher.min_val_accuracy=0.01"]) == 0
    assert "changed on resume: teacher.min_val_accuracy: 0.0 -> 0.01" in capsys.readouterr().err
    assert main.main(["train", str(path), "teacher.min_val_accuracy=0.99"]) == 2  # judged again at every start
    assert "is not good enough to teach" in error_line(capsys)
