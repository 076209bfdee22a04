"""Class-activation maps (CAM): the classifier applied at every location of the final feature map the models already
return. Because the head is average pooling then one linear layer, the mean of a window's CAM logits over its
locations is exactly the model's logit for that window. A cell covers `stride` input pixels a side (32 for the
standard stem, 16 for halfres, 8 for lowres; the last row and column cover what is left); in level-0 pixels that
is stride x base magnification / model magnification. A tissue cut into several windows gets one map on its own
cell grid, blended (averaged) where windows overlap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STEM_STRIDE = {"standard": 32, "halfres": 16, "lowres": 8}  # input px per feature-map cell (models.py stems)


@torch.no_grad()
def cam_logits(model: torch.nn.Module, features: torch.Tensor) -> torch.Tensor:
    """(N, classes, h, w) logits per location, in fp32: the FC layer on each feature vector."""
    weight, bias = model.fc.weight.float(), model.fc.bias.float()
    return torch.einsum("nchw,kc->nkhw", features.float(), weight) + bias[None, :, None, None]


def cell_edges(start: int, length_l0: int, image_len: int, cells: int, stride: int) -> np.ndarray:
    """Level-0 edges of the cells along one axis of a window: cell i covers input pixels [i*stride, (i+1)*stride)
    of the `image_len` the model saw, clipped to the image, mapped onto the window's `length_l0` level-0 pixels."""
    image_edges = np.minimum(np.arange(cells + 1) * stride, image_len)
    image_edges[-1] = image_len
    return start + image_edges * (length_l0 / image_len)  # not rounded: every whole cell is exactly as wide


@dataclass
class WindowMap:
    """One window's CAM: logits (classes, h, w) and the level-0 edges of its cells."""

    logits: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray

    @staticmethod
    def of(logits: np.ndarray, window: tuple[int, int, int, int], image_wh: tuple[int, int], stride: int) -> WindowMap:
        _, h, w = logits.shape
        return WindowMap(
            logits.astype(np.float32),
            cell_edges(window[0], window[2], image_wh[0], w, stride),
            cell_edges(window[1], window[3], image_wh[1], h, stride),
        )


@dataclass
class TissueMap:
    """A tissue's CAM on one grid: logits (classes, h, w), the level-0 box the grid covers and its cell edges."""

    logits: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (
            int(self.x_edges[0]),
            int(self.y_edges[0]),
            int(self.x_edges[-1] - self.x_edges[0]),
            int(self.y_edges[-1] - self.y_edges[0]),
        )

    def probabilities(self) -> np.ndarray:
        """Per-location class probabilities (softmax over classes)."""
        shifted = self.logits - self.logits.max(axis=0, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=0, keepdims=True)


def _grid(start: int, stop: int, cell: float) -> np.ndarray:
    count = max(1, int(np.ceil((stop - start) / cell - 1e-9)))
    edges = start + np.arange(count + 1) * cell  # not rounded: the stated cell size is every whole cell's
    edges[-1] = stop
    return edges


def tissue_map(windows: list[WindowMap]) -> TissueMap:
    """One window: its own map, exactly. Several: a grid at the windows' cell size over their union, each cell the
    mean of the window cells that hold its centre (adjacent windows tile, overlapping ones are blended)."""
    if len(windows) == 1:
        only = windows[0]
        return TissueMap(only.logits, only.x_edges, only.y_edges)
    cell = float(np.median([np.diff(w.x_edges).max() for w in windows]))
    xs = _grid(min(int(w.x_edges[0]) for w in windows), max(int(w.x_edges[-1]) for w in windows), cell)
    ys = _grid(min(int(w.y_edges[0]) for w in windows), max(int(w.y_edges[-1]) for w in windows), cell)
    total = np.zeros((windows[0].logits.shape[0], len(ys) - 1, len(xs) - 1), np.float64)
    count = np.zeros(total.shape[1:], np.int64)
    cx, cy = (xs[:-1] + xs[1:]) / 2, (ys[:-1] + ys[1:]) / 2
    for w in windows:
        col = np.searchsorted(w.x_edges, cx, side="right") - 1
        row = np.searchsorted(w.y_edges, cy, side="right") - 1
        inside_x = (col >= 0) & (col < w.logits.shape[2])
        inside_y = (row >= 0) & (row < w.logits.shape[1])
        rr, cc = np.ix_(np.flatnonzero(inside_y), np.flatnonzero(inside_x))
        total[:, rr, cc] += w.logits[:, row[inside_y]][:, :, col[inside_x]]
        count[rr, cc] += 1
    filled = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
    return TissueMap(filled, xs, ys)
