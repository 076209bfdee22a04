"""Which exported weights a run keeps: one Selection per export file (best.pt on train.select_metric, plus
best-<metric>.pt for each train.export_also), each remembering its best validation value and step, saved in every
checkpoint so a resume goes on choosing where it left off."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

LOWER_IS_BETTER = frozenset({"kl", "loss"})  # the rest (accuracy, f1, agreement, ...) are higher-is-better


def uses_ema(metric: str) -> bool:
    """ema_* metrics score the EMA weights, and a selection on one exports those weights."""
    return metric.startswith("ema_")


@dataclass
class Selection:
    metric: str
    file: str  # the export, in the run folder
    value: float | None = None
    step: int = -1
    tie_loss: float = math.inf  # val loss at the pick: breaks ties of a saturated metric (accuracy 1.0 at many epochs)
    at_pick: dict[str, float] = field(default_factory=dict)  # every scalar val metric at the pick (TensorBoard HParams)

    def improves(self, metrics: dict[str, Any]) -> bool:
        """True if these val metrics beat the kept pick (the first validation always does)."""
        value = metrics.get(self.metric)
        if value is None or self.value is None:
            return True
        if value == self.value:
            return self.tie_loss_of(metrics) < self.tie_loss
        return value < self.value if self.metric.removeprefix("ema_") in LOWER_IS_BETTER else value > self.value

    def tie_loss_of(self, metrics: dict[str, Any]) -> float:
        return metrics.get("ema_loss" if uses_ema(self.metric) else "loss", math.inf)

    def take(self, metrics: dict[str, Any], step: int) -> None:
        self.value, self.step, self.tie_loss = metrics.get(self.metric), step, self.tie_loss_of(metrics)
        self.at_pick = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def forget(self) -> None:
        """The export comes from a discarded trajectory: the next validation picks afresh."""
        self.value, self.step, self.tie_loss, self.at_pick = None, -1, math.inf, {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def selections_for(select_metric: str, export_also: list[str]) -> list[Selection]:
    """best.pt first (on the resolved select_metric), then best-<metric>.pt for each other metric named."""
    out = [Selection(select_metric, "best.pt")]
    out += [Selection(m, f"best-{m}.pt") for m in export_also if m != select_metric]
    return out


def restore_selections(
    selections: list[Selection], client: dict[str, Any], export_step: Callable[[str], int | None]
) -> list[str]:
    """Each selection's pick from a checkpoint's client state; returns a note for each pick that cannot go on and
    will be re-selected at the next validation: its export is from a trajectory this resume discards (a diverged or
    explicitly skipped stretch), or the checkpoint chose on another metric (or predates these records)."""
    saved = {s["file"]: s for s in client.get("selections", [])}
    notes = []
    for sel in selections:
        pick = saved.get(sel.file)
        if pick is None or pick["metric"] != sel.metric:
            was = f"on {pick['metric']}" if pick else "without a selection record"
            notes.append(f"{sel.file} was chosen {was}; it will be re-selected on {sel.metric}")
            continue
        sel.value, sel.step, sel.tie_loss = pick["value"], pick["step"], pick["tie_loss"]
        sel.at_pick = dict(pick.get("at_pick") or {})
        step = export_step(sel.file)
        if sel.value is not None and step is not None and step != sel.step:
            sel.forget()
            notes.append(f"{sel.file} (step {step}) is not from this trajectory and will be re-selected")
    return notes
