"""Validation per class in TensorBoard: each class's one-vs-rest accuracy and recall as scalars, and the confusion
matrix as an image (rows true, columns predicted; darker = more) and as a text table, at every validation."""

from __future__ import annotations

from typing import Any

import numpy as np

CELL = 24  # px per confusion cell in the image


def confusion_image(confusion: list[list[int]]) -> np.ndarray:
    """(H, W, 3) uint8: each row's counts as shares of its class, white (none) to black (all)."""
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    grey = np.rint(255 * (1 - shares)).astype(np.uint8)
    return np.repeat(np.repeat(grey, CELL, axis=0), CELL, axis=1)[..., None].repeat(3, axis=2)


def confusion_markdown(confusion: list[list[int]], classes: list[str]) -> str:
    head = "| true \\ predicted | " + " | ".join(classes) + " |"
    rows = [f"| {c} | " + " | ".join(str(v) for v in row) + " |" for c, row in zip(classes, confusion)]
    return "\n".join([head, "|---" * (len(classes) + 1) + "|", *rows])


def log_classes(trainer: Any, metrics: dict[str, Any]) -> None:
    if "per_class" not in metrics:
        return
    classes, step = trainer.plan.classes, trainer.state.global_step
    for name in ("accuracy", "recall"):
        for c, value in zip(classes, metrics["per_class"][name]):
            if value == value:  # NaN: a class absent from the validation set has no recall
                trainer.writer.add_scalar(f"val_class/{name}/{c}", value, step)
    trainer.writer.add_image("val/confusion", confusion_image(metrics["confusion"]), step, dataformats="HWC")
    trainer.writer.add_text("val/confusion", confusion_markdown(metrics["confusion"], classes), step)
