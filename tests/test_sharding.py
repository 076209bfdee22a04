"""hpcdistill.shards.sharding on real synthetic slides (pyramidal TIFF 40x, Aperio SVS 20x), real tars read back."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image

from hpcdistill.cli import main
from hpcdistill.shards import catalog, cut, plan, sample_format, writer
from hpcdistill.shards.sharding import ShardingError, ShardParams, run_sharding
from hpcdistill.slides import tissue
from hpcdistill.slides.windows import split_windows, window_alignment
from hpcdistill.synthetic import dataset as synthetic

MAGS = ("10x", "5x", "2.5x", "1.25x", "0.625x")
SMALL = dict(shard_size=150_000)  # several shards per split from a few small slides

LABELS = """slide,patient,label,split
s40a,p1,normal,train
s40b.svs,p2,tumor,train
s20,p3,tumor,train
s40c,p4,normal,val
s40d,p5,tumor,test
u1,p6,,
"""


def write_blank_tiff(path: Path) -> None:
    """A pyramidal 40x TIFF (mpp 0.25 in the resolution tags) of bare glass: no tissue."""
    image = np.full((1024, 1536, 3), 238, np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for level, res in ((image, 40000), (image[::4, ::4].copy(), 10000)):
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slides")
    good = root / "good"
    good.mkdir()
    for name, fmt, mag, mpp, cls, seed in [
        ("s40a", "tiff", 40, None, 0, 1),
        ("s40b", "svs", 40, None, 1, 2),
        ("s40c", "tiff", 40, None, 0, 3),
        ("s40d", "tiff", 40, None, 1, 4),
        ("s20", "svs", 20, 0.5, 1, 5),
        ("u1", "tiff", 40, None, 0, 6),
    ]:
        size = (1600, 1280) if mag == 20 else (2560, 2048)
        synthetic.write_slide(
            good / f"{name}.{fmt}", *size, fmt=fmt, base_mag=mag, mpp=mpp, class_id=cls, seed=seed, n_tissues=2
        )
    labels = root / "labels.csv"
    labels.write_text(LABELS)
    bad = root / "bad"
    bad.mkdir()
    write_blank_tiff(bad / "blank.tiff")
    synthetic.write_slide(bad / "nomag.tiff", 1536, 1024, fmt="tiff", base_mag=40, seed=7, with_metadata=False)
    data = (good / "s40b.svs").read_bytes()
    (bad / "corrupt.svs").write_bytes(data[: len(data) // 2])
    (bad / "notes.tif").write_text("not a slide\n")
    ref = root / "ref"
    manifest = run_sharding([good], ref, labels_csv=str(labels), params=ShardParams(**SMALL), progress=False)
    return {"root": root, "good": good, "bad": bad, "labels": labels, "ref": ref, "manifest": manifest}


def tar_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def read_samples(folder: Path) -> dict[str, dict]:
    """All samples of all shards via webdataset, decoding only images/cls/json explicitly (never pickles)."""

    def decode(sample: dict) -> dict:
        out = {"__key__": sample["__key__"]}
        for ext, value in sample.items():
            if ext.endswith((".jpg", ".png")):
                out[ext] = np.asarray(Image.open(io.BytesIO(value)).convert("RGB"))
            elif ext == "cls":
                out[ext] = int(value.decode("ascii"))
            elif ext == "json":
                out[ext] = json.loads(value)
        return out

    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(decode)
    return {s["__key__"]: s for s in pipeline}


# ------------------------------------------------------------------------------------------------------ units


def test_parse_size():
    assert plan.parse_size("256MB") == 256_000_000
    assert plan.parse_size("1GiB") == 2**30
    assert plan.parse_size(4096) == 4096
    with pytest.raises(ShardingError, match="'12 parsecs'"):
        plan.parse_size("12 parsecs")


def test_keys_have_no_dots():
    assert sample_format.sample_key("case.01 b", 3, 12) == "case-01-b_t003_w012"


def test_windows_are_aligned_and_cover_the_box():
    params = ShardParams(max_size=500)
    box = (1000, 700, 7000, 2100)
    windows = split_windows(box, (20000, 20000), 40.0, params.windowing)
    assert len(windows) == 4 * 2
    for x, y, w, h in windows:
        assert w % 64 == 0 and h % 64 == 0 and w <= 2000 and h <= 2000
    assert min(x for x, *_ in windows) <= 1000 and max(x + w for x, _, w, _ in windows) >= 8000
    assert split_windows((5, 5, 300, 300), (20000, 20000), 40.0, params.windowing) == [(5, 5, 300, 300)]
    assert window_alignment(20.0, params.mags) == 32


def test_inputs_from_directories_globs_and_files(dataset):
    good = dataset["good"]
    (good / "readme.txt").write_text("ignored: not a slide extension")
    from_dir = catalog.collect_slides([good])
    assert [p.name for p in from_dir] == sorted(
        ["s40a.tiff", "s40b.svs", "s40c.tiff", "s40d.tiff", "s20.svs", "u1.tiff"]
    )
    assert [p.name for p in catalog.collect_slides([f"{good}/*.svs", good / "s40a.tiff"])] == [
        "s20.svs",
        "s40a.tiff",
        "s40b.svs",
    ]
    with pytest.raises(ShardingError, match="matches no files"):
        catalog.collect_slides([f"{good}/*.ndpi"])


def test_patient_level_stratified_split_is_deterministic():
    rows = [
        catalog.LabelRow(f"s{i}", f"p{i // 2}", "ab"[i % 2] if i < 40 else "", "", i, Path(f"s{i}")) for i in range(44)
    ]
    first = catalog.assign_splits(rows, (0.7, 0.15, 0.15), seed=3)
    assert first == catalog.assign_splits(rows, (0.7, 0.15, 0.15), seed=3)
    assert first != catalog.assign_splits(rows, (0.7, 0.15, 0.15), seed=4)
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(r.patient, set()).add(first[r.slide])
    assert all(len(s) == 1 for s in by_patient.values())  # a patient never straddles splits
    assert [first[f"s{i}"] for i in range(40, 44)] == ["aux"] * 4  # unlabeled
    counts = {s: sum(1 for v in list(first.values())[:40] if v == s) for s in ("train", "val", "test")}
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0


@pytest.mark.parametrize(
    "body, line, reason",
    [
        ("slide,patient,label,split\ns40a,p1,normal,train\nnope,p2,tumor,val\n", 3, "unknown slide 'nope'"),
        ("slide,patient,label,split\ns40a,p1,normal,train\ns40a.tiff,p1,normal,train\n", 3, "duplicate row"),
        ("slide,patient,label,split\ns40a,p1,normal,training\n", 2, "unknown split 'training'"),
        ("slide,patient,label,split\ns40a,p1,normal,train\ns40c,p1,normal,test\n", 3, "patient 'p1'"),
    ],
)
def test_labels_csv_errors_name_file_line_and_reason(dataset, tmp_path, body, line, reason):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(body)
    with pytest.raises(ShardingError) as err:
        plan.make_plan(catalog.collect_slides([dataset["good"]]), csv_path, ShardParams())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{csv_path}:{line}: ") and reason in message


def test_slide_missing_from_csv_is_skipped(dataset):
    jobs, classes = plan.make_plan(catalog.collect_slides([dataset["good"]]), dataset["labels"], ShardParams())
    assert classes == ["normal", "tumor"]
    csv_path = dataset["root"] / "partial.csv"
    csv_path.write_text("slide,patient,label\ns40a,p1,normal\n")
    jobs, _ = plan.make_plan(catalog.collect_slides([dataset["good"]]), csv_path, ShardParams())
    skipped = {j.slide: j.skip_reason for j in jobs if j.skip_reason}
    assert skipped.keys() == {"s40b", "s40c", "s40d", "s20", "u1"}
    assert all(
        reason == f"{dataset['good'] / name}: not in labels CSV"
        for name, reason in ((Path(j.path).name, j.skip_reason) for j in jobs if j.skip_reason)  # names the slide file
    )


def test_explicit_class_order_sets_label_ids_and_refuses_unknown_labels(dataset, tmp_path, capsys):
    slides = [str(dataset["good"] / "s40a.tiff"), str(dataset["good"] / "s40b.svs")]
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,label,split\ns40a,p1,normal,train\ns40b,p2,tumor,train\n")
    out = tmp_path / "ordered"
    assert (
        main.main(
            [
                "shard",
                *slides,
                "--labels",
                str(labels),
                "--out",
                str(out),
                "--mags",
                "10,2.5",
                "--classes",
                "tumor,normal,necrosis",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["tumor", "normal", "necrosis"]  # the given order, absent classes kept
    assert manifest["splits"]["train"]["class_histogram"]["necrosis"] == 0
    ids = {s["json"]["slide"]: s["cls"] for s in read_samples(out).values()}
    assert ids and {ids[k] for k in ids if k == "s40a"} == {1} and {ids[k] for k in ids if k == "s40b"} == {0}
    code = main.main(
        [
            "shard",
            *slides,
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "bad"),
            "--classes",
            "normal,benign",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and f"{labels}:3: label 'tumor' is not in --classes (normal, benign)" in err
    with pytest.raises(ShardingError, match="normal repeated"):
        ShardParams(classes=("normal", "tumor", "normal"))


# ------------------------------------------------------------------------------------------------ real shards


def test_tars_are_webdataset_with_dotless_keys(dataset):
    ref, manifest = dataset["ref"], dataset["manifest"]
    assert not list(ref.glob(".*")), "no journal or temporary file left behind"
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
def test_low_mags_are_the_10x_crop_divided_by_n(dataset, tmp_path, slide, base_mag, image_format):
    folder = dataset["ref"]
    if image_format == "png":  # lossless: the agreement is then limited by the resampling alone
        folder = tmp_path
        run_sharding(
            [next(dataset["good"].glob(f"{slide}.*"))], folder, params=ShardParams(image_format="png"), progress=False
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


def test_manifest_counts_stats_and_statuses(dataset):
    m = dataset["manifest"]
    assert m["tool"] == "hpcdistill" and m["version"] and m["classes"] == ["normal", "tumor"]
    assert m["mags"] == [10.0, 5.0, 2.5, 1.25, 0.625] and m["image_format"] == "jpg"
    assert set(m["splits"]) == {"train", "val", "test", "aux"}
    samples = read_samples(dataset["ref"]).values()
    for split, entry in m["splits"].items():
        metas = [s["json"] for s in samples if s["json"]["split"] == split]
        assert entry["samples"] == len(metas)
        assert entry["tissues"] == len({(j["slide"], j["tissue"]) for j in metas})
        assert entry["slides"] == len({j["slide"] for j in metas})
        assert entry["patients"] == len({j["patient"] for j in metas})
        assert entry["class_histogram"] == {c: sum(j["label"] == c for j in metas) for c in m["classes"]}
        assert entry["shards"] == sorted(p.name for p in dataset["ref"].glob(f"{split}-*.tar"))
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
    assert sorted(p.name for p in (dataset["ref"] / "qc").glob("*.png")) == [f"{s}.png" for s in sorted(m["slides"])]


@pytest.mark.slow
def test_same_inputs_give_identical_bytes_with_parallel_workers(dataset, tmp_path):
    manifest = run_sharding(
        [dataset["good"]],
        tmp_path,
        labels_csv=str(dataset["labels"]),
        params=ShardParams(**SMALL),
        workers=2,
        progress=False,
    )
    assert tar_bytes(tmp_path) == tar_bytes(dataset["ref"])
    assert manifest == dataset["manifest"]


def test_max_size_splits_tissues_into_aligned_windows(dataset, tmp_path):
    manifest = run_sharding([dataset["good"] / "s40a.tiff"], tmp_path, params=ShardParams(max_size=128), progress=False)
    samples = read_samples(tmp_path)
    assert manifest["slides"]["s40a"]["samples"] == len(samples) > 2 * manifest["slides"]["s40a"]["tissues"]
    assert any(k.endswith("_w003") for k in samples)
    for sample in samples.values():
        w10, h10 = sample["json"]["sizes"]["10x"]
        assert w10 <= 128 and h10 <= 128
        x, y, w, h = sample["json"]["box_l0"]
        if w % 64 == 0 and h % 64 == 0:  # interior windows: whole pixels at every mag, exactly /N
            assert sample["json"]["sizes"]["0.625x"] == [w10 // 16, h10 // 16] and w10 % 16 == 0


def test_bad_slides_are_skipped_with_one_line_reasons(dataset, tmp_path, capsys):
    inputs = [str(dataset["bad"]), str(dataset["good"] / "s40a.tiff")]
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


def test_dry_run_plans_what_shard_cuts_and_writes_only_qc_and_plan(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    inputs = [str(dataset["good"]), str(dataset["bad"] / "blank.tiff"), str(dataset["bad"] / "corrupt.svs")]
    labels = tmp_path / "labels.csv"
    labels.write_text(LABELS)  # the bad slides are not in it: skipped as "not in labels CSV", like shard does
    args = ["shard", *inputs, "--labels", str(labels), "--out", str(out), "--shard-size", "150000", "--no-progress"]
    assert main.main([*args, "--dry-run", "--workers", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "qc"]  # no tars, no manifest, no journal
    plan = json.loads((out / "plan.json").read_text())
    ref = dataset["manifest"]
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
    assert tar_bytes(out) == tar_bytes(dataset["ref"])


def test_strict_and_nothing_shardable_fail(dataset, tmp_path, capsys):
    inputs = [str(dataset["bad"] / "blank.tiff"), str(dataset["good"] / "s40a.tiff")]
    assert main.main(["shard", *inputs, "--out", str(tmp_path / "a"), "--strict", "--no-progress"]) == 2
    assert main.main(["shard", str(dataset["bad"]), "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hpcdistill: error:")]
    assert len(errors) == 2 and "--strict" in errors[0] and "nothing could be sharded" in errors[1]
    assert (tmp_path / "b" / "manifest.json").exists()  # the statuses are still recorded


def test_mag_above_base_skips_slide(dataset, tmp_path):
    manifest = run_sharding(
        [dataset["good"] / "s20.svs", dataset["good"] / "s40a.tiff"],
        tmp_path,
        params=ShardParams(mags=(40.0, 10.0)),
        progress=False,
    )
    assert manifest["slides"]["s20"]["status"] == "skipped" and "40x" in manifest["slides"]["s20"]["reason"]
    assert manifest["slides"]["s40a"]["status"] == "ok"


def test_folder_with_different_params_is_refused(dataset, tmp_path, capsys):
    good = str(dataset["good"] / "s40a.tiff")
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


def test_disk_full_keeps_completed_shards_and_resumes(dataset, tmp_path, monkeypatch):
    real_append, calls = writer.append_sample, []

    def append_until_disk_full(archive, key, payloads):
        calls.append(key)
        if len(calls) == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(archive, key, payloads)

    monkeypatch.setattr(writer, "append_sample", append_until_disk_full)
    with pytest.raises(ShardingError) as err:
        run_sharding(
            [dataset["good"]], tmp_path, labels_csv=str(dataset["labels"]), params=ShardParams(**SMALL), progress=False
        )
    assert "\n" not in str(err.value) and "disk full" in str(err.value) and str(tmp_path) in str(err.value)
    journal = json.loads((tmp_path / writer.JOURNAL).read_text())
    assert journal["shards"] and sorted(journal["shards"]) == sorted(tar_bytes(tmp_path))
    assert all(tar_bytes(tmp_path)[name] == tar_bytes(dataset["ref"])[name] for name in journal["shards"])
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / cut.SPOOL).exists()
    monkeypatch.setattr(writer, "append_sample", real_append)
    manifest = run_sharding(
        [dataset["good"]], tmp_path, labels_csv=str(dataset["labels"]), params=ShardParams(**SMALL), progress=False
    )
    assert tar_bytes(tmp_path) == tar_bytes(dataset["ref"]) and manifest == dataset["manifest"]


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_output(dataset, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "hpcdistill.cli.main",
        "shard",
        str(dataset["good"]),
        "--out",
        str(out),
        "--labels",
        str(dataset["labels"]),
        "--shard-size",
        "150000",
        "--shard-max-samples",
        "1",
        "--no-progress",
    ]
    ref = tmp_path / "ref"
    run_sharding(
        [dataset["good"]],
        ref,
        labels_csv=str(dataset["labels"]),
        params=ShardParams(**SMALL, shard_max_samples=1),
        progress=False,
    )
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    journal = out / writer.JOURNAL
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and json.loads(journal.read_text() or "{}").get("shards"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / writer.MANIFEST).exists()
    done_before = json.loads(journal.read_text())["shards"]
    assert 1 <= len(done_before) < len(tar_bytes(ref))
    (out / ".train-000099.tar.tmp").write_bytes(b"partial")  # what a kill mid-write leaves behind
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert not list(out.glob(".*")), "stale temporaries and the journal are gone"
    assert tar_bytes(out) == tar_bytes(ref)
    keys = [
        m.name.split(".", 1)[0]
        for p in sorted(out.glob("*.tar"))
        for m in tarfile.open(p).getmembers()
        if m.name.endswith(".json")
    ]
    assert len(keys) == len(set(keys)) == sum(1 for _ in read_samples(ref))


@pytest.fixture
def small_disk(dataset, tmp_path):
    """A real tmpfs holding about half of the reference output when the tests run as root (as CI does); None where
    mounting is not allowed, and the test then injects the full disk where libvips and the tar writer see it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = sum(p.stat().st_size for p in dataset["ref"].rglob("*") if p.is_file()) // 2 // 4096 * 4096
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
        ).returncode
        != 0
    ):
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def inject_full_disk(monkeypatch) -> None:
    """The fallback: libvips fails the third QC PNG as it does on a full disk (its own error type, the OS text)."""
    import pyvips

    real, calls = tissue.write_qc_png, []

    def write_until_full(*args, **kwargs):
        calls.append(args[0])
        if len(calls) >= 3:
            raise pyvips.Error("unable to call pngsave_target", "write failed: No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(tissue, "write_qc_png", write_until_full)


def test_full_disk_while_sharding_is_one_line_leaves_no_partials_and_resumes(
    dataset, small_disk, tmp_path, capsys, monkeypatch
):
    out = (small_disk or tmp_path) / "out"
    args = [
        "shard",
        str(dataset["good"]),
        "--out",
        str(out),
        "--labels",
        str(dataset["labels"]),
        "--shard-size",
        "150000",
        "--no-progress",
        "--workers",
        "2" if small_disk else "1",
    ]
    if small_disk is None:
        inject_full_disk(monkeypatch)
    assert main.main(args) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if "hpcdistill" in line]
    assert len(ours) == 1 and "Traceback" not in err, err[-3000:]  # no slide was logged as skipped for it
    assert ours[0].startswith(f"hpcdistill: error: {out}: disk full while writing ")
    assert ours[0].endswith("free some space and rerun the same command to resume")
    leftovers = [*out.glob(".*.tmp"), *out.glob(cut.SPOOL), *(out / "qc").glob("*.partial")]
    assert not leftovers, leftovers
    if small_disk:  # space freed: the same command completes
        subprocess.run(["mount", "-o", "remount,size=256m", str(small_disk)], check=True)
    else:
        monkeypatch.undo()
    assert main.main(args) == 0
    assert tar_bytes(out) == tar_bytes(dataset["ref"])  # the bytes of an uninterrupted run


def test_labels_csv_without_a_label_column_is_refused(dataset, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,split\ns40a,p1,train\ns40b,p2,train\n")
    out = tmp_path / "out"
    assert main.main(["shard", str(dataset["good"]), "--labels", str(labels), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"hpcdistill: error: {labels}:1: no 'label' column (columns: slide, patient, split); ")
    assert "shard without --labels" in line and not out.exists()


def test_every_skipped_line_names_its_slide(dataset, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,label,split\ns40a,p1,normal,train\n")
    slides = [str(dataset["good"] / "s40a.tiff"), str(dataset["good"] / "s40b.svs"), str(dataset["bad"] / "blank.tiff")]
    assert main.main(["shard", *slides, "--labels", str(labels), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert skipped == [
        f"hpcdistill: skipped {dataset['bad'] / 'blank.tiff'}: not in labels CSV",
        f"hpcdistill: skipped {dataset['good'] / 's40b.svs'}: not in labels CSV",
    ]
