"""`hpcdistill shard` on real synthetic slides (pyramidal TIFF 40x, Aperio SVS 20x), real tars read back: the
format, magnifications, manifest, identical bytes, windows, skipped slides and the dry run."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from shard_fixtures import LABELS, MAGS, SMALL, data_part, read_samples, tar_bytes

from hpcdistill.cli import main
from hpcdistill.common.folder_lock import LOCK
from hpcdistill.shards import writer
from hpcdistill.shards.sharding import ShardParams, run_sharding


def test_tars_are_webdataset_with_dotless_keys(shard_slides):
    ref, manifest = shard_slides["ref"], shard_slides["manifest"]
    # no journal or temporary file left behind; the writer lock file stays (empty, held by nobody)
    assert [p.name for p in ref.glob(".*")] == [LOCK]
    total = 0
    for path in sorted(ref.glob("*.tar")):
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
        keys = {m.name.split(".", 1)[0] for m in members}
        assert all("." not in k for k in keys)
        for key in keys:
            names = {m.name.split(".", 1)[1] for m in members if m.name.startswith(key + ".")}
            assert {f"{m}.jpg" for m in MAGS} | {"json"} <= names
        total += len(keys)
        members_bytes = sum(512 + -(-m.size // 512) * 512 for m in members)
        assert path.stat().st_size == writer._tar_file_size(members_bytes)  # the cap is checked on exact sizes
        assert path.stat().st_size <= 150_000 or len(keys) == 1
    samples = read_samples(ref)
    assert len(samples) == total == sum(s["samples"] for s in manifest["splits"].values())
    labeled = [s for s in samples.values() if s["json"]["label"]]
    assert labeled and all(s["cls"] == ["normal", "tumor"].index(s["json"]["label"]) for s in labeled)
    assert all("cls" not in s for s in samples.values() if s["json"]["split"] == "aux")
    assert len(manifest["splits"]["train"]["shards"]) >= 2


@pytest.mark.parametrize(
    "slide, base_mag, image_format", [("s40a", 40.0, "jpg"), ("s20", 20.0, "jpg"), ("s40b", 40.0, "png")]
)
def test_low_mags_are_the_10x_crop_divided_by_n(shard_slides, tmp_path, slide, base_mag, image_format):
    folder = shard_slides["ref"]
    if image_format == "png":  # lossless: the agreement is then limited by the resampling alone
        folder = tmp_path
        run_sharding(
            [next(shard_slides["good"].glob(f"{slide}.*"))],
            folder,
            params=ShardParams(image_format="png"),
            progress=False,
        )
    samples = [s for s in read_samples(folder).values() if s["json"]["slide"] == slide]
    assert samples
    tolerance = 3.0 if image_format == "png" else 8.0  # JPEG q90 on crops of a few dozen px costs a few levels
    for sample in samples:
        meta = sample["json"]
        ten = Image.fromarray(sample[f"10x.{image_format}"])
        assert meta["base_mag"] == base_mag and meta["sizes"]["10x"] == [ten.width, ten.height]
        for mag, n in (("2.5x", 4), ("0.625x", 16)):
            low = sample[f"{mag}.{image_format}"].astype(float)
            assert abs(ten.width / n - low.shape[1]) <= 1 and abs(ten.height / n - low.shape[0]) <= 1
            if min(low.shape[:2]) < 8:
                continue  # a sliver: too few pixels for a meaningful correlation
            expected = np.asarray(ten.resize(low.shape[1::-1], Image.Resampling.LANCZOS), dtype=float)
            diff = np.abs(expected - low).mean()
            corr = np.corrcoef(expected.ravel(), low.ravel())[0, 1]
            shifted = np.corrcoef(np.roll(expected, 2, axis=1).ravel(), low.ravel())[0, 1]
            assert diff < tolerance and corr > 0.95 and corr > shifted + 0.01, (slide, mag, diff, corr, shifted)


def test_manifest_counts_stats_and_statuses(shard_slides):
    m = shard_slides["manifest"]
    assert m["tool"] == "hpcdistill" and m["version"] and m["classes"] == ["normal", "tumor"]
    assert m["mags"] == [10.0, 5.0, 2.5, 1.25, 0.625] and m["image_format"] == "jpg"
    assert set(m["splits"]) == {"train", "val", "test", "aux"}
    samples = read_samples(shard_slides["ref"]).values()
    for split, entry in m["splits"].items():
        metas = [s["json"] for s in samples if s["json"]["split"] == split]
        assert entry["samples"] == len(metas)
        assert entry["tissues"] == len({(j["slide"], j["tissue"]) for j in metas})
        assert entry["slides"] == len({j["slide"] for j in metas})
        assert entry["patients"] == len({j["patient"] for j in metas})
        assert entry["class_histogram"] == {c: sum(j["label"] == c for j in metas) for c in m["classes"]}
        assert entry["shards"] == sorted(p.name for p in shard_slides["ref"].glob(f"{split}-*.tar"))
    assert m["splits"]["train"]["slides"] == 3 and m["splits"]["train"]["patients"] == 3
    assert m["splits"]["train"]["tissues"] >= 6 and m["splits"]["aux"]["slides"] == 1
    assert m["splits"]["aux"]["class_histogram"] == {"normal": 0, "tumor": 0}
    assert m["slides"]["s20"] == {**m["slides"]["s20"], "status": "ok", "base_mag": 20.0, "split": "train"}
    assert all(s["status"] == "ok" and s["reason"] is None for s in m["slides"].values())
    assert set(m["stats"]) == set(MAGS)
    for stat in m["stats"].values():
        assert all(0.3 < v < 1.0 for v in stat["mean"]) and all(0.02 < v < 0.5 for v in stat["std"])
    assert m["stats"]["10x"]["std"][1] > m["stats"]["0.625x"]["std"][1]  # detail is lost at low mag
    ten, low = m["sizes"]["10x"]["median"], m["sizes"]["1.25x"]["median"]
    assert abs(ten[0] / 8 - low[0]) <= 1
    assert m["params"]["shard_size"] == 150_000 and m["params"]["labels_csv"] == "labels.csv"
    assert sorted(p.name for p in (shard_slides["ref"] / "qc").glob("*.png")) == [
        f"{s}.png" for s in sorted(m["slides"])
    ]


@pytest.mark.slow
def test_same_inputs_give_identical_bytes_with_parallel_workers(shard_slides, tmp_path):
    manifest = run_sharding(
        [shard_slides["good"]],
        tmp_path,
        labels_csv=str(shard_slides["labels"]),
        params=ShardParams(**SMALL),
        workers=2,
        progress=False,
    )
    assert tar_bytes(tmp_path) == tar_bytes(shard_slides["ref"])
    assert data_part(manifest) == data_part(shard_slides["manifest"])


def test_max_size_splits_tissues_into_aligned_windows(shard_slides, tmp_path):
    manifest = run_sharding(
        [shard_slides["good"] / "s40a.tiff"], tmp_path, params=ShardParams(max_size=128), progress=False
    )
    samples = read_samples(tmp_path)
    assert manifest["slides"]["s40a"]["samples"] == len(samples) > 2 * manifest["slides"]["s40a"]["tissues"]
    assert any(k.endswith("_w003") for k in samples)
    for sample in samples.values():
        w10, h10 = sample["json"]["sizes"]["10x"]
        assert w10 <= 128 and h10 <= 128
        x, y, w, h = sample["json"]["box_l0"]
        if w % 64 == 0 and h % 64 == 0:  # interior windows: whole pixels at every mag, exactly /N
            assert sample["json"]["sizes"]["0.625x"] == [w10 // 16, h10 // 16] and w10 % 16 == 0


def test_bad_slides_are_skipped_with_one_line_reasons(shard_slides, tmp_path, capsys):
    inputs = [str(shard_slides["bad"]), str(shard_slides["good"] / "s40a.tiff")]
    code = main.main(["shard", *inputs, "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    reasons = {name: s["reason"] for name, s in manifest["slides"].items() if s["status"] == "skipped"}
    assert reasons.keys() == {"blank", "nomag", "corrupt", "notes"}
    expected = {
        "blank": ("no tissue",),
        "nomag": ("no magnification",),
        "corrupt": ("truncated", "corrupt"),
        "notes": ("not a TIFF", "unsupported", "not a slide"),
    }
    for name, reason in reasons.items():
        assert "\n" not in reason and name in reason and any(e in reason for e in expected[name]), reason
    assert manifest["slides"]["s40a"]["status"] == "ok"
    assert sum(1 for line in capsys.readouterr().err.splitlines() if line.startswith("hpcdistill: skipped")) == 4


def test_dry_run_plans_what_shard_cuts_and_writes_only_qc_and_plan(shard_slides, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [
        str(shard_slides["good"]),
        str(shard_slides["bad"] / "blank.tiff"),
        str(shard_slides["bad"] / "corrupt.svs"),
    ]
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)  # the bad slides are not in it: skipped as "not in labels CSV", like shard does
    args = ["shard", *inputs, "--labels", str(labels), "--out", str(out), "--shard-size", "150000", "--no-progress"]
    assert main.main([*args, "--dry-run", "--workers", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "qc"]  # no tars, no manifest, no journal
    plan = json.loads((out / "plan.json").read_text())
    ref = shard_slides["manifest"]
    for split, entry in ref["splits"].items():  # the plan's counts are the ones the real run produced
        planned = plan["splits"][split]
        assert [planned[k] for k in ("samples", "tissues", "slides", "patients")] == [
            entry[k] for k in ("samples", "tissues", "slides", "patients")
        ], split
    rows = {row["slide"]: row for row in plan["slides"]}
    assert rows["s20"]["base_mag"] == 20.0 and rows["s20"]["mag_source"] == ref["slides"]["s20"]["mag_source"]
    assert {k for k, r in rows.items() if r["status"] != "ok"} == {"blank", "corrupt"}
    assert rows["blank"]["reason"] == f"{rows['blank']['path']}: not in labels CSV"
    printed = capsys.readouterr().out
    assert "train: " in printed and "2 would be skipped" in printed
    assert main.main([*args, "--dry-run", "--strict"]) == 2
    assert main.main(args) == 0  # a real run into the previewed folder is unaffected by it
    assert tar_bytes(out) == tar_bytes(shard_slides["ref"])


def test_strict_and_nothing_shardable_fail(shard_slides, tmp_path, capsys):
    inputs = [str(shard_slides["bad"] / "blank.tiff"), str(shard_slides["good"] / "s40a.tiff")]
    assert main.main(["shard", *inputs, "--out", str(tmp_path / "a"), "--strict", "--no-progress"]) == 2
    assert main.main(["shard", str(shard_slides["bad"]), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hpcdistill: error:")]
    assert len(errors) == 2 and "--strict" in errors[0] and "nothing could be sharded" in errors[1]
    assert (tmp_path / "b" / "manifest.json").exists()  # the statuses are still recorded


def test_mag_above_base_skips_slide(shard_slides, tmp_path):
    manifest = run_sharding(
        [shard_slides["good"] / "s20.svs", shard_slides["good"] / "s40a.tiff"],
        tmp_path,
        params=ShardParams(mags=(40.0, 10.0)),
        progress=False,
    )
    assert manifest["slides"]["s20"]["status"] == "skipped" and "40x" in manifest["slides"]["s20"]["reason"]
    assert manifest["slides"]["s40a"]["status"] == "ok"


def test_folder_with_different_params_is_refused(shard_slides, tmp_path, capsys):
    good = str(shard_slides["good"] / "s40a.tiff")
    assert main.main(["shard", good, "--out", str(tmp_path), "--no-progress"]) == 0
    before = tar_bytes(tmp_path)
    assert main.main(["shard", good, "--out", str(tmp_path), "--no-progress"]) == 0  # same params: nothing to do
    assert main.main(["shard", good, "--out", str(tmp_path), "--jpeg-quality", "80", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hpcdistill: error: {tmp_path}: ") and "jpeg_quality" in err and "--overwrite" in err
    assert tar_bytes(tmp_path) == before
    assert (
        main.main(["shard", good, "--out", str(tmp_path), "--jpeg-quality", "80", "--overwrite", "--no-progress"]) == 0
    )
    assert tar_bytes(tmp_path) != before


def test_every_skipped_line_names_its_slide(shard_slides, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,label,split\ns40a,p1,normal,train\n")
    slides = [
        str(shard_slides["good"] / "s40a.tiff"),
        str(shard_slides["good"] / "s40b.svs"),
        str(shard_slides["bad"] / "blank.tiff"),
    ]
    assert main.main(["shard", *slides, "--labels", str(labels), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert skipped == [
        f"hpcdistill: skipped {shard_slides['bad'] / 'blank.tiff'}: not in labels CSV",
        f"hpcdistill: skipped {shard_slides['good'] / 's40b.svs'}: not in labels CSV",
    ]


def test_overwrite_removes_only_what_a_run_wrote_and_says_how_many(shard_slides, tmp_path, capsys):
    good = str(shard_slides["good"] / "s40a.tiff")
    assert main.main(["shard", good, "--out", str(tmp_path), "--no-progress"]) == 0
    ours = sorted(p.name for p in tmp_path.glob("*.tar")) + ["qc/s40a.png", "qc/s40a.geojson", "manifest.json"]
    mine = ["mydata.tar", "train-backup.tar", "aux-old-000001.tar", "qc/my_figure.png", "tasks/keep.txt"]
    for name in mine:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("the user's own file\n")
    capsys.readouterr()
    assert (
        main.main(["shard", good, "--out", str(tmp_path), "--jpeg-quality", "80", "--overwrite", "--no-progress"]) == 0
    )
    assert all((tmp_path / name).read_text() == "the user's own file\n" for name in mine)
    assert f"--overwrite: removed {len(ours)} files an earlier run wrote in {tmp_path}" in capsys.readouterr().err
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["jpeg_quality"] == 80
