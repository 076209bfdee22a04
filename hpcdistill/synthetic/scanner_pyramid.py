"""Pyramid levels as a scanner makes them: each level is the one above it, as stored (decoded from its JPEG
tiles), shrunk 4x with a box (area) filter and JPEG-encoded again at a scanner-like quality. A renderer that draws
every level from the scene, as `synthetic.dataset` does by default, gives a pyramid no scanner writes: its low
levels hold finer detail and one JPEG generation fewer than a real slide's.

The level above is kept decoded in a memory-mapped scratch file beside the output, so memory stays bounded for any
slide size (disk: 3 bytes per level-0 pixel while the slide is written)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import imagecodecs
import numpy as np

from hpcdistill.synthetic.scene import TILE

SCANNER_JPEG_QUALITY = 75  # reduced levels: a common scanner setting, below the base level's
STEP = 4  # each level is 1/4 of the one above, as the pyramids written here
SCANNER_MIN_LEVEL = 128  # scanners keep shrinking down to a few hundred px, so low magnifications have a level


def encode(tile: np.ndarray, quality: int) -> bytes:
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2))


def stored(tile: bytes | np.ndarray) -> np.ndarray:
    """What a reader decodes from a written tile."""
    return imagecodecs.jpeg8_decode(tile) if isinstance(tile, bytes) else tile


class ScannerPyramid:
    """Tile iterators for each level in turn: level 0 from `render_tiles`, each next level from the stored pixels
    of the level before it. Levels must be consumed in order, each completely."""

    def __init__(self, scratch: Path, levels: list[tuple[int, int, int]], jpeg: bool):
        self.scratch, self.levels, self.jpeg = scratch, levels, jpeg
        self.above: np.ndarray | None = None

    def level_tiles(self, k: int, render_tiles: Callable[[], Iterator[bytes | np.ndarray]]) -> Iterator:
        _, width, height = self.levels[k]
        kept = np.lib.format.open_memmap(self.scratch / f"level{k}.npy", "w+", np.uint8, (height, width, 3))
        tiles = render_tiles() if k == 0 else self._shrunk_tiles(width, height)
        across, count = -(-width // TILE), -(-width // TILE) * -(-height // TILE)
        for index, tile in enumerate(tiles):
            ty, tx = divmod(index, across)
            y, x = ty * TILE, tx * TILE
            pixels = stored(tile)[: height - y, : width - x]
            kept[y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels
            if index == count - 1:  # before the last yield: the writer takes no tile after it
                kept.flush()
                self.above = kept
            yield tile

    def _shrunk_tiles(self, width: int, height: int) -> Iterator[bytes | np.ndarray]:
        above = self.above
        assert above is not None, "levels are written in order"
        for y in range(0, height, TILE):
            for x in range(0, width, TILE):
                block = above[STEP * y : STEP * (y + TILE), STEP * x : STEP * (x + TILE)]
                h, w = block.shape[0] // STEP, block.shape[1] // STEP
                area = block[: h * STEP, : w * STEP].reshape(h, STEP, w, STEP, 3).mean(axis=(1, 3))
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                tile[:h, :w] = np.clip(np.rint(area), 0, 255).astype(np.uint8)
                yield encode(tile, SCANNER_JPEG_QUALITY) if self.jpeg else tile
