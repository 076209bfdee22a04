"""The method registry: what each method is called in reports and in which order it is shown. Experiment files name
methods explicitly (`label:`); a run evaluated on its own gets the label its resolved config implies."""

from __future__ import annotations

from typing import Any

from hpcdistill.config.schema import RESIZES

TEACHER, BASELINE, KD = "Teacher", "Baseline", "KD"
AUX_PREFIX = "KD ("  # "KD (ADv1)": KD with auxiliary unlabeled sets
# The supplementary pixel-loss ablation, in table order: no pixel loss, max-pool only, interpolation only, both.
ABLATION = {(): "KD", ("maxpool",): "KD+MP", ("bicubic",): "KD+INT", ("maxpool", "bicubic"): "KD+MP+INT"}
ABLATION_ORDER = tuple(ABLATION.values())
# The paper's names for `synth`'s aux sets (ADv1 = aux1, ADv2 = aux1 + aux2), so a run evaluated on its own is
# called as in the demo and the README; other sets keep their split names.
AUX_NAMES = {"aux1": "ADv1", "aux1+aux2": "ADv2"}


def method_label(config: dict[str, Any]) -> str:
    """A readable method name from a run's resolved config, used when the caller gives none: Teacher, Baseline,
    KD (both pixel-loss terms, the paper's method), KD+FT, or the ablation names, with the aux sets in brackets."""
    train, data = config.get("train", {}), config.get("data", {})
    mode = train.get("mode", "")
    if mode == "teacher":
        return TEACHER
    if mode == "baseline":
        return BASELINE
    aux = "+".join(data.get("aux", []))
    aux = AUX_NAMES.get(aux, aux)
    suffix = f" ({aux})" if aux else ""
    if mode == "finetune":
        return f"KD+FT{suffix}"
    resize = tuple(r for r in RESIZES if r in train.get("pixel_resize", RESIZES))
    return (KD if resize == RESIZES else ABLATION[resize]) + suffix


def method_order(method: str) -> tuple:
    """Tables and figures list the teacher, the baseline, plain KD, KD with aux sets, then the rest alphabetically."""
    rank = {TEACHER: 0, BASELINE: 1, KD: 2}.get(method, 3 if method.startswith(AUX_PREFIX) else 4)
    return (rank, method)
