"""Choosing exports on validation: lower-is-better metrics, tie-breaks, the EMA of the weights, extra exports
(best-<metric>.pt), and a resume that goes on choosing exactly as an uninterrupted run (real loop, real shards)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cfg_for

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.train import loop
from hpcdistill.train.ema import WeightAverage
from hpcdistill.train.selection import Selection, restore_selections


def blob(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_selection_direction_and_ties():
    loss = Selection("loss", "best-loss.pt")
    loss.take({"loss": 0.5}, 10)
    assert loss.improves({"loss": 0.4}) and not loss.improves({"loss": 0.6})
    acc = Selection("accuracy", "best.pt")
    acc.take({"accuracy": 1.0, "loss": 0.3}, 10)
    assert not acc.improves({"accuracy": 0.9, "loss": 0.1})
    assert acc.improves({"accuracy": 1.0, "loss": 0.2})  # a saturated metric: the lower val loss wins the tie
    ema = Selection("ema_accuracy", "best-ema_accuracy.pt")
    ema.take({"ema_accuracy": 1.0, "ema_loss": 0.3, "loss": 0.0}, 10)
    assert ema.tie_loss == 0.3  # an EMA pick breaks ties on the EMA weights' own loss
    assert not ema.improves({"ema_accuracy": 1.0, "ema_loss": 0.5, "loss": 0.0})


def test_restore_refuses_a_pick_made_on_another_metric():
    saved = {"selections": [{"metric": "agreement", "file": "best.pt", "value": 0.9, "step": 5, "tie_loss": 1.0}]}
    sel = Selection("ema_kl", "best.pt")
    notes = restore_selections([sel], saved, lambda name: 5)
    assert sel.value is None and notes == ["best.pt was chosen on agreement; it will be re-selected on ema_kl"]
    same = Selection("agreement", "best.pt")
    assert restore_selections([same], saved, lambda name: 5) == [] and (same.value, same.step) == (0.9, 5)
    stale = Selection("agreement", "best.pt")
    notes = restore_selections([stale], saved, lambda name: 7)  # best.pt was written on a discarded trajectory
    assert stale.value is None and "(step 7) is not from this trajectory" in notes[0]


def test_the_shipped_baseline_configs_pick_on_the_ema():
    from hpcdistill.config.loading import load_config

    for setup in ("demo", "celiac", "luad"):
        assert load_config(f"configs/{setup}/baseline.yaml").select_metric == "ema_accuracy", setup


def test_weight_average_matches_the_formula():
    model = torch.nn.Linear(3, 2)
    avg = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    expected = start.clone()
    for n in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
        avg.update(model)
    assert torch.allclose(avg.module.weight, expected, atol=1e-6)
    assert not torch.allclose(avg.module.weight, model.weight)
    copy = WeightAverage(model, decay=0.9)
    copy.load_state_dict(avg.state_dict())
    assert copy.updates == 30 and torch.equal(copy.module.weight, avg.module.weight)


SELECT = (
    "train.ema_decay=0.9",
    "train.export_also=[kl,loss,agreement,ema_kl,ema_agreement]",
    "train.epochs=4",
    "data.epoch_samples=4",
    "train.grad_accum=1",
    "train.checkpoint_every_steps=3",
)


def val_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {
        tag[4:]: [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith("val/")
    }


def test_exports_per_metric_and_exact_resume(tiny_dataset, tiny_teacher, tmp_path):
    extra = (*SELECT, f"teacher.checkpoint={tiny_teacher}")
    full = loop.run(cfg_for(tiny_dataset, tmp_path, "full", "distill", 2.5, *extra))
    run = Path(full["run_dir"])
    history = val_history(run)
    assert {"kl", "loss", "agreement", "ema_kl", "ema_loss", "ema_agreement"} <= set(history)
    first_lowest = lambda metric: min(history[metric], key=lambda sv: (sv[1], sv[0]))[0]  # noqa: E731
    for metric in ("kl", "ema_kl"):
        assert blob(run / f"best-{metric}.pt")["global_step"] == first_lowest(metric), metric
    assert full["select_metric"] == "loss"  # the distill default: the val distillation loss
    assert blob(run / "best.pt")["global_step"] == full["best_step"] == first_lowest("loss")
    assert not (run / "best-loss.pt").exists()  # export_also naming best.pt's own metric adds no copy
    ema_weights, last_weights = blob(run / "last-ema.pt")["state_dict"], blob(run / "last.pt")["state_dict"]
    assert any(not torch.equal(ema_weights[k], last_weights[k]) for k in ema_weights)

    # The same run stopped after 5 of its 16 steps (mid-epoch checkpoint at 3) and resumed: every export the same.
    part = cfg_for(tiny_dataset, tmp_path, "part", "distill", 2.5, *extra, "train.max_steps=5")
    assert loop.run(part)["stopped_early"]
    rest = loop.run(cfg_for(tiny_dataset, tmp_path, "part", "distill", 2.5, *extra))
    assert rest["global_step"] == full["global_step"] == 16
    for name in (
        "best.pt",
        "best-kl.pt",
        "best-agreement.pt",
        "best-ema_kl.pt",
        "best-ema_agreement.pt",
        "last-ema.pt",
    ):
        a, b = blob(run / name), blob(Path(rest["run_dir"]) / name)
        assert a["global_step"] == b["global_step"], name
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), name


def test_ema_decay_cannot_change_on_resume(tiny_dataset, tiny_teacher, tmp_path):
    extra = (*SELECT, f"teacher.checkpoint={tiny_teacher}")
    loop.run(cfg_for(tiny_dataset, tmp_path, "run", "distill", 2.5, *extra, "train.max_steps=2"))
    with pytest.raises(HpcdistillError, match=r"cannot resume with a changed train.ema_decay: 0.9 -> 0.99"):
        loop.run(cfg_for(tiny_dataset, tmp_path, "run", "distill", 2.5, *extra, "train.ema_decay=0.99"))


def test_a_config_key_older_checkpoints_lack_reads_as_its_default():
    from hpcdistill.config.schema import Config
    from hpcdistill.train.resume import config_changes

    stored = Config().to_dict()
    del stored["train"]["ema_decay"]
    assert config_changes(stored, Config().to_dict(), Config().to_dict()) == []
    assert config_changes(stored, Config().to_dict()) == [("train.ema_decay", None, 0.0)]
