"""The gate before distillation: a teacher that did not learn would pass on its errors as soft targets, silently. Its
export's recorded validation accuracy (macro one-vs-rest, as the reports show it) must reach `teacher.min_val_accuracy`
and, when `teacher.reference` names another export (e.g. the baseline at the student's magnification), beat that
export's. A teacher whose validation calls were (nearly) all one class (scoring.cohort_checks) is refused whatever
its accuracy (with the gate off, no floor and no reference, it is said): its soft targets would teach that one
class. `teacher.gate=warn` says the shortfall and goes on."""

from __future__ import annotations

from hpcdistill.common.console import say
from hpcdistill.common.errors import TrainError
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.models.export import ExportedModel, load_exported
from hpcdistill.scoring.cohort_checks import COLLAPSE_SHARE

GATE_METRIC = "accuracy"


def recorded_accuracy(export: ExportedModel, key: str) -> float:
    """The export's validation accuracy at its pick; an export without one cannot be judged (one line)."""
    value = export.val.get(GATE_METRIC)
    if value is None:
        raise TrainError(
            f"{key}: {export.path} records no validation accuracy (exported by an older version, or trained without "
            f"data.val); retrain it, or set teacher.gate=warn to distill from it unjudged"
        )
    return value


def collapsed(teacher: ExportedModel) -> list[str]:
    """The clause for a teacher that called (nearly) every validation tissue one class; [] for any other, and for an
    export that does not record its calls (older versions)."""
    share = teacher.val.get("max_call_share")
    if share is None or len(teacher.classes) < 2 or share < COLLAPSE_SHARE:
        return []
    return [f"it called {100 * share:.0f}% of its validation tissues one class: it has collapsed onto one class"]


def gate_shortfalls(cfg: Config, teacher: ExportedModel) -> list[str]:
    """What keeps this teacher from teaching, as readable clauses ([] = it may teach)."""
    gate = cfg.teacher
    if not gate.min_val_accuracy and not gate.reference:  # the gate is off: a collapse is said, nothing refused
        for clause in collapsed(teacher):
            say(f"warning: teacher.checkpoint: {cfg.teacher.checkpoint}: {clause} (not refused: the gate is off)")
        return []
    try:
        accuracy = recorded_accuracy(teacher, "teacher.checkpoint")
    except TrainError as err:
        if gate.gate == "warn":
            return [str(err)]
        raise
    found = collapsed(teacher)
    if accuracy < gate.min_val_accuracy:
        found.append(
            f"its validation accuracy {accuracy:.4f} is below teacher.min_val_accuracy {gate.min_val_accuracy:.4f}"
        )
    if gate.reference:
        reference = load_exported(resolve_path(gate.reference))
        bar = recorded_accuracy(reference, "teacher.reference")
        if accuracy <= bar:
            found.append(
                f"its validation accuracy {accuracy:.4f} does not beat teacher.reference {gate.reference} ({bar:.4f})"
            )
    return found


def check_teacher(cfg: Config, teacher: ExportedModel) -> None:
    """Refuse (or with teacher.gate=warn, say) a teacher not good enough to teach, in one line."""
    found = gate_shortfalls(cfg, teacher)
    if not found:
        return
    line = (
        f"teacher.checkpoint: {cfg.teacher.checkpoint} is not good enough to teach: {'; '.join(found)}. Train "
        "the teacher longer (README: the training recipe), or set teacher.gate=warn to distill anyway"
    )
    if cfg.teacher.gate == "refuse":
        raise TrainError(line)
    say(f"warning: {line}")
