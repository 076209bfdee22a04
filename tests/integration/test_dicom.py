"""DICOM whole-slide images, as hospitals' archives serve them: a folder of VL WSI instances (one per level, written
by pydicom from a synthetic slide and from the true Aperio SVS the tests use) is one slide, read through OpenSlide 4,
and `shard`, `predict` and region files see the same pixels as in the source."""

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
from hpcdistill.slides.catalog import collect_slides
from hpcdistill.slides.factory import open_slide
from hpcdistill.slides.tissue import TissueParams
from hpcdistill.slides.windows import DEFAULT_WINDOWING, Windowing, find_windows
from hpcdistill.synthetic import dataset as synthetic
from hpcdistill.synthetic.dicom import write_dicom_wsi


@pytest.fixture(scope="module")
def dicom_pair(tmp_path_factory) -> dict[str, Path]:
    """A synthetic 40x SVS, its exact DICOM copy (uncompressed tiles) and a scanner-like one (JPEG tiles)."""
    root = tmp_path_factory.mktemp("dicom")
    svs = root / "source" / "case.svs"
    synthetic.write_slide(svs, synthetic.SlideSpec(4096, 3072, fmt="svs", base_mag=40, class_id=0, seed=2, tissues=2))
    write_dicom_wsi(svs, root / "exact" / "case", mpp=0.25, compression="none")
    write_dicom_wsi(svs, root / "jpeg" / "case", mpp=0.25)
    return {"svs": svs, "exact": root / "exact" / "case", "jpeg": root / "jpeg" / "case", "root": root}


def test_a_dicom_folder_is_one_slide_with_the_sources_pixels(dicom_pair):
    assert collect_slides([dicom_pair["exact"].parent]) == [dicom_pair["exact"].resolve()]
    with open_slide(dicom_pair["svs"]) as svs, open_slide(dicom_pair["exact"]) as dicom:
        assert (
            dicom.backend == "openslide"
            and dicom.info.vendor == "dicom"
            and dicom.info.path == str(dicom_pair["exact"])
        )
        assert (dicom.info.width, dicom.info.height, dicom.info.mpp) == (svs.info.width, svs.info.height, 0.25)
        assert (dicom.info.base_mag, dicom.info.mag_source) == (40.0, "mpp")  # from its pixel spacing
        assert [lv.width for lv in dicom.levels()] == [lv.width for lv in svs.levels()]
        box = (1000, 700, 1600, 1200)
        for source in ("level0", "pyramid"):
            a = svs.read_at_mags(box, {10.0: (400, 300), 2.5: (100, 75)}, source)
            b = dicom.read_at_mags(box, {10.0: (400, 300), 2.5: (100, 75)}, source)
            assert all(np.array_equal(a[m], b[m]) for m in a), source


def test_an_empty_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match=r"empty: a folder is read as a slide only when it holds DICOM WSI"):
        open_slide(tmp_path / "empty")


def test_the_true_aperio_svs_converts_and_reads_alike(svs, tmp_path):
    write_dicom_wsi(svs, tmp_path / "aperio", mpp=0.499, compression="none")
    with open_slide(svs) as source, open_slide(tmp_path / "aperio") as dicom:
        assert [(lv.width, lv.height) for lv in dicom.levels()] == [(lv.width, lv.height) for lv in source.levels()]
        assert dicom.info.base_mag == source.info.base_mag == 20.04
        box = (0, 0, 2100, 1500)
        assert np.array_equal(
            source.read_at_mag(box, 5.0, (525, 375), "pyramid"), dicom.read_at_mag(box, 5.0, (525, 375), "pyramid")
        )


@pytest.mark.slow
def test_shard_and_predict_read_the_dicom_as_the_source(dicom_pair, tmp_path):
    outs = {}
    for name in ("svs", "jpeg"):
        out = tmp_path / f"shards-{name}"
        assert main.main(["shard", str(dicom_pair[name]), "--mags", "10,2.5", "--out", str(out), "--no-progress"]) == 0
        outs[name] = (json.loads((out / "manifest.json").read_text()), read_samples(out))
    (svs_manifest, svs_samples), (dcm_manifest, dcm_samples) = outs["svs"], outs["jpeg"]
    assert dcm_manifest["slides"]["case"]["mpp"] == 0.25 and dcm_manifest["slides"]["case"]["base_mag"] == 40.0
    assert dcm_manifest["slides"]["case"]["tissues"] == svs_manifest["slides"]["case"]["tissues"] == 2
    assert sorted(svs_samples) == sorted(dcm_samples)  # the same tissues and windows
    for key, sample in svs_samples.items():
        a, b = sample["10x.jpg"].astype(int), dcm_samples[key]["10x.jpg"].astype(int)
        assert a.shape == b.shape and np.abs(a - b).mean() < 2.0, key  # the DICOM's own JPEG tiles, then ours

    torch.manual_seed(0)
    model = build_model("resnet10", 2, width=8, groups=4, stem="lowres")
    stats = {"mean": [0.8, 0.6, 0.75], "std": [0.15, 0.2, 0.15]}
    blob = export_blob(
        model, mag=2.5, classes=["a", "b"], stats=stats, config={}, global_step=0, windowing=dict(DEFAULT_WINDOWING)
    )
    torch.save(blob, tmp_path / "m.pt")
    for name in ("svs", "exact"):
        argv = ["predict", str(tmp_path / "m.pt"), str(dicom_pair[name]), "--out", str(tmp_path / f"p-{name}")]
        assert main.main([*argv, "--no-progress"]) == 0
    rows = [json.loads((tmp_path / f"p-{n}" / "predictions.json").read_text())["slides"][0] for n in ("svs", "exact")]
    assert [w["box_l0"] for w in rows[0]["windows"]] == [w["box_l0"] for w in rows[1]["windows"]]
    assert np.allclose([w["probs"] for w in rows[0]["windows"]], [w["probs"] for w in rows[1]["windows"]], atol=1e-6)
    geojson = json.loads(Path(rows[1]["geojson"]).read_text())
    assert len(geojson["features"]) == len(rows[1]["tissues"]) == 2  # outlines in level-0 px, as for the SVS


@pytest.mark.slow
def test_region_files_apply_to_a_dicom_slide_in_level0_px(dicom_pair, tmp_path):
    with open_slide(dicom_pair["exact"]) as slide:
        found = find_windows(slide, TissueParams(), Windowing.from_dict(DEFAULT_WINDOWING))
    x, y, w, h = found.boxes[0]
    ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
    geometry = {"type": "Polygon", "coordinates": [ring]}
    region = {"type": "Feature", "geometry": geometry, "properties": {"objectType": "annotation"}}
    rois = tmp_path / "rois"
    rois.mkdir()
    (rois / "case.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [region]}))
    out = tmp_path / "shards"
    argv = ["shard", str(dicom_pair["exact"]), "--mags", "10", "--out", str(out), "--rois", str(rois), "--no-progress"]
    assert main.main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["slides"]["case"]["tissues"] == 1 and found.boxes[1:]  # only the tissue inside the region
