"""What a sharding run will do: sizes, keys, aligned windows, slide inputs, the labels CSV and its errors, the
patient-level split, the class order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shard_fixtures import read_samples

from hpcdistill.cli import main
from hpcdistill.common.errors import SlideError
from hpcdistill.shards import plan, sample_format
from hpcdistill.shards.sharding import ShardingError, ShardParams
from hpcdistill.slides import catalog
from hpcdistill.slides.windows import split_windows, window_alignment


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


def test_inputs_from_directories_globs_and_files(shard_slides):
    good = shard_slides["good"]
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
    with pytest.raises(SlideError, match="matches no files"):
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
def test_labels_csv_errors_name_file_line_and_reason(shard_slides, tmp_path, body, line, reason):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(body)
    with pytest.raises(SlideError) as err:
        plan.make_plan(catalog.collect_slides([shard_slides["good"]]), csv_path, ShardParams())
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{csv_path}:{line}: ") and reason in message


def test_slide_missing_from_csv_is_skipped(shard_slides):
    jobs, classes = plan.make_plan(
        catalog.collect_slides([shard_slides["good"]]), shard_slides["labels"], ShardParams()
    )
    assert classes == ["normal", "tumor"]
    csv_path = shard_slides["root"] / "partial.csv"
    csv_path.write_text("slide,patient,label\ns40a,p1,normal\n")
    jobs, _ = plan.make_plan(catalog.collect_slides([shard_slides["good"]]), csv_path, ShardParams())
    skipped = {j.slide: j.skip_reason for j in jobs if j.skip_reason}
    assert skipped.keys() == {"s40b", "s40c", "s40d", "s20", "u1"}
    assert all(
        reason == f"{shard_slides['good'] / name}: not in labels CSV"
        for name, reason in ((Path(j.path).name, j.skip_reason) for j in jobs if j.skip_reason)  # names the slide file
    )


def test_explicit_class_order_sets_label_ids_and_refuses_unknown_labels(shard_slides, tmp_path, capsys):
    slides = [str(shard_slides["good"] / "s40a.tiff"), str(shard_slides["good"] / "s40b.svs")]
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


def test_labels_csv_without_a_label_column_is_refused(shard_slides, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,patient,split\ns40a,p1,train\ns40b,p2,train\n")
    out = tmp_path / "out"
    assert main.main(["shard", str(shard_slides["good"]), "--labels", str(labels), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"hpcdistill: error: {labels}:1: no 'label' column (columns: slide, patient, split); ")
    assert "shard without --labels" in line and not out.exists()
