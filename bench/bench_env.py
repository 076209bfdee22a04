"""What every bench script prints first, and how it summarises rounds: the machine (CPU model, cores) and the
library versions the figures depend on, and the median with the spread of interleaved rounds."""

from __future__ import annotations

import statistics
from pathlib import Path

from hpcdistill.experiment.demo_record import machine, versions


def describe() -> str:
    """One line: CPU model and cores; libvips, libjpeg-turbo as Pillow links it, torch."""
    from PIL import features

    m, v = machine(), versions()
    jpeg = features.version("libjpeg_turbo") or "absent"
    return (
        f"{m['cpu']} ({m['cores']} cores); libvips {v['libvips']}, Pillow {v['pillow']} with libjpeg-turbo "
        f"{jpeg}, pyvips {v['pyvips']}, torch {v['torch']}"
    )


def publish(text: str, path: str) -> None:
    """Print a script's markdown table and write it to `path` ('' = print only)."""
    print(text)
    if path:
        Path(path).write_text(text)


def median_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) over rounds."""
    return statistics.median(values), min(values), max(values)


def ratio_line(name: str, values: list[float], reference: list[float]) -> str:
    """`name`'s median rate, and its per-round ratio to the reference (rounds interleaved: round i with round i)."""
    ratios = [v / r for v, r in zip(values, reference)]
    med, low, high = median_spread(ratios)
    return f"{name}: {statistics.median(values):8.1f}/s, ratio median {med:.3f} (rounds {low:.3f}-{high:.3f})"
