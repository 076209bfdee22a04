"""A magnification is a pixel size: the same scene scanned at 0.2500 and at 0.2325 um/px (both "40x" to the scanner)
is cut by the real `shard` and `predict` at one physical scale, and the objective basis (how folders were cut
before) shows the 7.5% error the default removes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_fixtures import read_samples

from hpcdistill.cli import main
from hpcdistill.models.export import export_blob
from hpcdistill.models.resnet import build_model
from hpcdistill.slides.windows import DEFAULT_WINDOWING
from hpcdistill.synthetic import dataset as synthetic

SCENE_UM = (3000, 2250)  # the scene's size in microns, whatever the pixel size
MPPS = {"a": 0.25, "b": 0.2325}


@pytest.fixture(scope="module")
def two_scanners(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two_scanners")
    for name, mpp in MPPS.items():
        size = (round(SCENE_UM[0] / mpp), round(SCENE_UM[1] / mpp))
        spec = synthetic.SlideSpec(*size, fmt="svs", base_mag=40, mpp=mpp, class_id=0, seed=3, tissues=2)
        synthetic.write_slide(root / f"{name}.svs", spec)  # AppMag 40 on both: only the pixel size tells them apart
    return root


def tissue(image: np.ndarray) -> np.ndarray:
    """The grey levels inside the bounding box of a window's tissue (saturated pixels)."""
    saturation = image.max(axis=-1).astype(int) - image.min(axis=-1)
    rows, cols = np.flatnonzero((saturation > 40).any(axis=1)), np.flatnonzero((saturation > 40).any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(float).mean(axis=-1)


def best_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two tissue crops aligned to within one pixel (their boxes are found on thumbnails)."""
    h, w = min(a.shape[0], b.shape[0]) - 2, min(a.shape[1], b.shape[1]) - 2
    inner = b[1 : h + 1, 1 : w + 1].ravel()
    return max(np.corrcoef(a[dy : dy + h, dx : dx + w].ravel(), inner)[0, 1] for dy in range(3) for dx in range(3))


def shard(two_scanners: Path, out: Path, *flags: str) -> tuple[dict, dict]:
    slides = [str(two_scanners / f"{name}.svs") for name in MPPS]
    assert main.main(["shard", *slides, "--mags", "10,2.5", "--no-progress", "--out", str(out), *flags]) == 0
    return json.loads((out / "manifest.json").read_text()), read_samples(out)


@pytest.mark.slow
def test_two_pixel_sizes_give_the_same_tissue_at_10x(two_scanners, tmp_path):
    manifest, samples = shard(two_scanners, tmp_path / "physical")
    assert manifest["params"]["mag_scale"] == {"basis": "mpp", "mpp_at_10x": 1.0}
    recorded = {s: (v["base_mag"], v["mag_source"], v["mpp"]) for s, v in manifest["slides"].items()}
    assert recorded == {"a": (40.0, "mpp", 0.25), "b": (43.011, "mpp", 0.2325)}
    for t in ("t000", "t001"):
        a, b = (tissue(samples[f"{s}_{t}_w000"]["10x.jpg"]) for s in MPPS)
        assert abs(a.shape[0] - b.shape[0]) <= 1 and abs(a.shape[1] - b.shape[1]) <= 1, (t, a.shape, b.shape)
        assert best_correlation(a, b) > 0.97, t  # 0.993 and 0.986 measured: the same nuclei, the same size

    manifest, samples = shard(two_scanners, tmp_path / "objective", "--mag-from", "objective")
    assert "mag_scale" not in manifest["params"]  # as folders were fingerprinted before the option
    assert {s: v["base_mag"] for s, v in manifest["slides"].items()} == {"a": 40.0, "b": 40.0}
    for t in ("t000", "t001"):
        a, b = (tissue(samples[f"{s}_{t}_w000"]["10x.jpg"]) for s in MPPS)
        assert b.shape[1] / a.shape[1] > 1.05  # the 0.2325 um/px scan's tissue is 7.5% larger at "10x"


@pytest.mark.slow
def test_an_old_folder_resumes_only_on_its_own_scale(two_scanners, tmp_path, capsys):
    shard(two_scanners, tmp_path / "old", "--mag-from", "objective")
    slides = [str(two_scanners / f"{name}.svs") for name in MPPS]
    argv = ["shard", *slides, "--mags", "10,2.5", "--no-progress", "--out", str(tmp_path / "old")]
    capsys.readouterr()
    assert main.main(argv) == 2  # the default scale would cut other windows into the same folder
    assert "mag_scale" in capsys.readouterr().err
    assert main.main([*argv, "--mag-from", "objective"]) == 0


@pytest.mark.slow
def test_predict_reads_at_the_models_scale_and_records_it(two_scanners, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("resnet10", 2, width=8, groups=4, stem="lowres")
    stats = {"mean": [0.8, 0.6, 0.75], "std": [0.15, 0.2, 0.15]}
    scale = {"basis": "mpp", "mpp_at_10x": 1.0}
    blob = export_blob(
        model, mag=2.5, classes=["a", "b"], stats=stats, config={}, global_step=0, windowing=dict(DEFAULT_WINDOWING)
    )
    torch.save({**blob, "mag_scale": scale}, tmp_path / "m.pt")
    slides = [str(two_scanners / f"{name}.svs") for name in MPPS]
    assert main.main(["predict", str(tmp_path / "m.pt"), *slides, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert summary["mag_scale"] == scale
    rows = {r["slide"]: r for r in summary["slides"]}
    assert {s: (r["base_mag"], r["mag_source"], r["mpp"]) for s, r in rows.items()} == {
        "a": (40.0, "mpp", 0.25),
        "b": (43.011, "mpp", 0.2325),
    }
    sizes = {s: [w["size"] for w in r["windows"]] for s, r in rows.items()}
    assert all(abs(p - q) <= 2 for wa, wb in zip(sizes["a"], sizes["b"]) for p, q in zip(wa, wb)), sizes
    header = (tmp_path / "p" / "slides.csv").read_text().splitlines()[0].split(",")
    assert {"base_mag", "mpp", "mag_source"} <= set(header)
    capsys.readouterr()
    argv = ["predict", str(tmp_path / "m.pt"), slides[1], "--out", str(tmp_path / "o"), "--mag-from", "objective"]
    assert main.main([*argv, "--no-progress"]) == 0  # allowed (to measure a scale error), and said
    assert "cut at another scale than in training" in capsys.readouterr().err
    (row,) = json.loads((tmp_path / "o" / "predictions.json").read_text())["slides"]
    assert (row["base_mag"], row["mag_source"]) == (40.0, "objective-power")
