"""What the slide tests share: a session-wide Aperio SVS, pyramidal TIFFs of chosen pixels, and the one-line
error check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import TILE, write_svs

from hpcdistill.common.errors import HpcdistillError

BACKGROUND = 240


def write_pyramid_tiff(path: Path, image: np.ndarray, *, mpp: float | None, subifds: bool) -> None:
    """Generic tiled pyramidal TIFF (lossless), levels as SubIFDs or pages; mpp only in resolution tags."""
    res = dict(resolution=(10000 / mpp, 10000 / mpp), resolutionunit="CENTIMETER") if mpp else {}
    common = dict(photometric="rgb", compression="zlib", tile=(TILE, TILE), metadata=None, **res)
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, subifds=1 if subifds else 0, **common)
        tw.write(np.ascontiguousarray(image[::4, ::4]), subfiletype=1, **common)


def tissue_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), BACKGROUND, np.uint8)
    image[height // 4 : height // 2, width // 5 : width // 2] = (200, 110, 170)
    image += rng.integers(0, 6, image.shape, dtype=np.uint8)
    return image


@pytest.fixture(scope="session")
def svs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    image = tissue_image(2100, 1500)
    level1 = np.ascontiguousarray(image[::4, ::4])
    level1[:8, :8] = (0, 255, 0)  # only in the reduced level: proves where the thumbnail came from
    write_svs(path, image, level1=level1)
    return path


def assert_one_line_error(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    text = str(err.value)
    assert isinstance(err.value, HpcdistillError)
    assert "\n" not in text and text.startswith(f"{path}: ")
    for word in words:
        assert word in text
