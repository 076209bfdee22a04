"""One shard sample as tar members, the layout every reader relies on: `<key>.<mag>.<jpg|png>` per magnification,
`<key>.cls` (the class index, labelled samples only) and `<key>.json` (slide, patient, tissue, window, level-0 box,
base magnification, mpp, the size at each magnification, label and split). The sharder writes samples only through
these functions, and so do the tests that need shards of chosen pixels, so both stay in step with the format."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from hpcdistill.common.mags import mag_name
from hpcdistill.slides.catalog import key_safe


def sample_key(slide: str, tissue_index: int, window: int) -> str:
    """WebDataset splits file names at the first dot, so keys keep only [A-Za-z0-9_-]. Keys are names, never
    parsed back: a sample's slide, tissue and window are in its json."""
    return f"{key_safe(slide)}_t{tissue_index:03d}_w{window:03d}"


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_member(mag: float, pixels: np.ndarray, image_format: str, quality: int) -> tuple[str, bytes]:
    return f"{mag_name(mag)}.{image_format}", encode_image(pixels, image_format, quality)


def sample_meta(
    *,
    slide: str,
    patient: str,
    tissue: int,
    window: int,
    box_l0: Any,
    base_mag: float,
    mpp: float | None,
    sizes: dict[str, list[int]],
    label: str | None,
    split: str,
) -> dict[str, Any]:
    return {
        "slide": slide,
        "patient": patient,
        "tissue": tissue,
        "window": window,
        "box_l0": list(map(int, box_l0)),
        "base_mag": float(base_mag),
        "mpp": mpp,
        "sizes": sizes,
        "label": label,
        "split": split,
    }


def label_members(class_id: int | None, meta: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The members after the images: `cls` when labelled, then `json`."""
    members = [] if class_id is None else [("cls", str(class_id).encode("ascii"))]
    return members + [("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8"))]
