"""Validation per class in TensorBoard: each class's one-vs-rest accuracy and recall as scalars, and the confusion
matrix as an image (rows true, columns predicted, class names and counts; darker = a larger share of the row) and as
a text table, at every validation."""

from __future__ import annotations

from typing import Any

import numpy as np

CELL = 48  # px per confusion cell in the image
CHAR = 6  # px per character of PIL's default bitmap font
NAME_CHARS = 40  # a class name is drawn to this length: the image's size stays bounded whatever the labels say


def confusion_image(confusion: list[list[int]], classes: list[str]) -> np.ndarray:
    """(H, W, 3) uint8: rows true, columns predicted, each cell shaded by its share of the row (white none, dark
    all) with its count written in it, and the class names along both sides."""
    from PIL import Image, ImageDraw

    counts = np.asarray(confusion, dtype=np.int64)
    classes = [c[:NAME_CHARS] for c in classes]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k, left, top = len(classes), CHAR * max(len(c) for c in classes) + 12, 30
    image = Image.new("RGB", (left + k * CELL + 4, top + k * CELL + 4), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 2), "predicted:", fill="black")
    for i, name in enumerate(classes):
        draw.text((4, top + i * CELL + CELL // 2 - 5), name, fill="black")  # the true class of row i
        draw.text((left + i * CELL + 2, 16), name[: CELL // CHAR], fill="black")  # the predicted class of column i
        for j in range(k):
            grey = int(round(235 * (1 - shares[i, j]))) + 20
            box = (left + j * CELL, top + i * CELL, left + (j + 1) * CELL - 1, top + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=(grey, grey, grey), outline="black" if i == j else None)
            ink = "white" if grey < 128 else "black"
            draw.text(
                (box[0] + CELL // 2 - CHAR * len(str(counts[i, j])) // 2, box[1] + CELL // 2 - 5),
                str(counts[i, j]),
                fill=ink,
            )
    return np.asarray(image)


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
    image = confusion_image(metrics["confusion"], classes)
    trainer.writer.add_image("val/confusion", image, step, dataformats="HWC")
    trainer.writer.add_text("val/confusion", confusion_markdown(metrics["confusion"], classes), step)
