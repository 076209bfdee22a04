"""What makes a synthetic slide an Aperio SVS beyond its pyramid: the description header, the associated images
(label and macro, as Aperio writes them after the pyramid) and the stripped pages that hold them and the
thumbnail."""

from __future__ import annotations

import numpy as np
import tifffile

from hpcdistill.synthetic.scene import Scene, render_image

APERIO_HEADER = "Aperio Image Library v12.0.0"
JPEG_QUALITY = 90


def fit(width: int, height: int, longest: int) -> tuple[int, int, float]:
    d = max(width, height) / longest
    return max(1, round(width / d)), max(1, round(height / d)), d


def label_image(seed: int) -> np.ndarray:
    """A slide label: white card with a seed-dependent barcode."""
    img = np.full((300, 300, 3), 250, np.uint8)
    bars = np.random.default_rng([seed, 0x1ABE1]).integers(0, 2, 60).astype(bool)
    for i, bar in enumerate(bars):
        if bar:
            img[40:140, 30 + 4 * i : 33 + 4 * i] = 20
    img[180:200, 30:270] = 60
    return img


def macro_image(scene: Scene) -> np.ndarray:
    """Whole glass slide: label area on the left, then the scanned area rendered small."""
    w, h, d = fit(scene.width, scene.height, 600)
    body = render_image(scene, w, h, d)
    macro = np.full((h + 40, w + 40 + h, 3), 200, np.uint8)
    label = label_image(scene.seed)
    pick = np.arange(h) * label.shape[0] // h  # nearest-neighbour resize of the label to h x h
    macro[20 : 20 + h, 20 : 20 + h] = label[pick][:, pick]
    macro[20 : 20 + h, 20 + h : 20 + h + w] = body
    return macro


def aperio_tail(base_mag: float, mpp: float, with_metadata: bool) -> str:
    return f"|AppMag = {base_mag:g}|MPP = {mpp:.4f}" if with_metadata else ""


def write_label_and_macro(tif: tifffile.TiffWriter, scene: Scene) -> None:
    """The Aperio associated images that follow the pyramid: label (LZW) and macro (JPEG), both stripped."""
    label, macro = label_image(scene.seed), macro_image(scene)
    write_stripped(tif, label, "lzw", label.shape[0], 1, f"{APERIO_HEADER}\r\nlabel {label.shape[1]}x{label.shape[0]}")
    write_stripped(tif, macro, "jpeg", 16, 9, f"{APERIO_HEADER}\r\nmacro {macro.shape[1]}x{macro.shape[0]}")


def write_stripped(
    tif: tifffile.TiffWriter,
    image: np.ndarray,
    compression: str,
    rowsperstrip: int,
    subfiletype: int | None,
    description: str,
) -> None:
    """A stripped RGB page as Aperio writes its thumbnail, label and macro."""
    args = {"compressionargs": {"level": JPEG_QUALITY}} if compression == "jpeg" else {}
    extra = {} if subfiletype is None else {"subfiletype": subfiletype}
    tif.write(
        image,
        photometric="rgb",
        compression=compression,
        rowsperstrip=rowsperstrip,
        metadata=None,
        software=False,
        description=description,
        **args,
        **extra,
    )


# --------------------------------------------------------------------------- datasets

# (format, base magnification) cycled over slides; tiff slides carry their magnification only through mpp.
