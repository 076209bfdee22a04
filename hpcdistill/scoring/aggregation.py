"""From windows to the units a pathologist signs out: one rule, shared by `predict`'s slide calls and
`evaluate --unit slide|patient`, turns the probabilities of a unit's tissue windows into the unit's scores.

- mean: the tissue-area-weighted mean of the window probabilities, then argmax;
- max: per class the highest tissue probability (a tissue's probability is the area-weighted mean of its windows),
  then argmax: one confident tissue decides.

A patient's windows are those of all the patient's slides, so the same rule makes the patient call."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from hpcdistill.common.errors import ScoringError

SLIDE_RULES = {
    "mean": "area-weighted mean of window probabilities, then argmax",
    "max": "per class the highest tissue probability, then argmax",
}
UNITS = ("tissue", "slide", "patient")


def area_mean(probs: list[list[float]] | np.ndarray, areas: list[float] | np.ndarray) -> np.ndarray:
    weights = np.asarray(areas, dtype=np.float64)
    return (np.asarray(probs, dtype=np.float64) * (weights / weights.sum())[:, None]).sum(0)


def combine(probs: np.ndarray, areas: np.ndarray, tissues: list[Any], rule: str) -> np.ndarray:
    """The scores of a unit from its windows' probabilities, level-0 areas and tissue ids, by `rule`."""
    if rule not in SLIDE_RULES:
        raise ScoringError(f"slide rule {rule!r}: expected one of {', '.join(SLIDE_RULES)}")
    if rule == "mean":
        return area_mean(probs, areas)
    ids = list(dict.fromkeys(tissues))
    per_tissue = [area_mean(probs[[t == i for t in tissues]], areas[[t == i for t in tissues]]) for i in ids]
    return np.max(per_tissue, axis=0)


def unit_rows(rows: list[dict[str, Any]], unit: str, rule: str, patient_of: Callable[[str], str]) -> list[dict]:
    """Rows of one unit each ({"unit", "y", "probs", "pred", "windows"}), from window rows carrying "slide",
    "tissue", "area", "probs" and "y" (-1: unlabelled, left out). The tissue unit is the rows themselves."""
    if unit not in UNITS:
        raise ScoringError(f"unit {unit!r}: expected one of {', '.join(UNITS)}")
    labelled = [r for r in rows if r["y"] >= 0]
    if unit == "tissue":
        return [
            {"unit": r["key"], "y": r["y"], "probs": list(r["probs"]), "pred": r["pred"], "windows": 1}
            for r in labelled
        ]
    groups: dict[str, list[dict]] = {}
    for r in labelled:
        groups.setdefault(r["slide"] if unit == "slide" else patient_of(r["slide"]), []).append(r)
    out = []
    for name, members in sorted(groups.items()):
        labels = sorted({r["y"] for r in members})
        if len(labels) > 1:
            raise ScoringError(f"{unit} {name}: its slides carry different labels ({labels}); score it by slide")
        probs = np.array([r["probs"] for r in members], dtype=np.float64)
        areas = np.array([r.get("area", 1.0) for r in members], dtype=np.float64)
        tissues = [(r["slide"], r.get("tissue", i)) for i, r in enumerate(members)]
        scores = combine(probs, areas, tissues, rule)
        out.append(
            {
                "unit": name,
                "y": labels[0],
                "probs": scores.tolist(),
                "pred": int(scores.argmax()),
                "windows": len(members),
            }
        )
    return out
