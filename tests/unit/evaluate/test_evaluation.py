"""`evaluate` on a real engine checkpoint and real shards: record, predictions, GFLOPs and bad inputs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.evaluate.evaluation import evaluate_checkpoint, predict_split
from hpcdistill.evaluate.options import EvalOptions
from hpcdistill.evaluate.report import load_results
from hpcdistill.scoring.method_labels import ABLATION_ORDER, method_label, method_order
from hpcdistill.shards.manifest import mag_stats, read_manifest
from hpcdistill.shards.reader import decode_sample, raw_samples, resolve_sets


def split_slides(manifest: dict, split: str) -> set[str]:
    return {name for name, s in manifest["slides"].items() if s["split"] == split and s["status"] == "ok"}


def test_evaluate_writes_record_and_predictions(tiny_dataset, tiny_teacher):
    record = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], EvalOptions(split="test", iterations=200))
    assert record["method"] == "Teacher" and record["mag"] == 10.0
    assert record["samples"] == tiny_dataset["manifest"]["splits"]["test"]["samples"]
    for metric in ("accuracy", "f1", "precision", "recall"):
        point, low, high = record["metrics"][metric]
        assert 0.0 <= low <= point <= high <= 1.0
    assert sum(map(sum, record["confusion"])) == record["samples"]
    flops = record["gflops"]
    assert flops["median"] > 0 and flops["fixed"] > flops["median"]  # 512 px fixed > ~80 px median tissue
    with open(tiny_teacher.parent / "eval" / "test_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == record["samples"] and all("." not in r["key"] for r in rows)
    # each row's slide is its sample's own (from the sample's json, never parsed from the key), label likewise
    shards, manifest = tiny_dataset["shards"], tiny_dataset["manifest"]
    meta = {
        raw["__key__"]: decode_sample(raw, ["json"])["json"]
        for raw in raw_samples(resolve_sets(shards, manifest, ["test"]).urls)
    }
    assert [r["key"] for r in rows] == list(meta)  # shard order
    assert all(r["slide"] == meta[r["key"]]["slide"] and r["label"] == meta[r["key"]]["label"] for r in rows)
    slides = split_slides(manifest, "test")
    assert {r["slide"] for r in rows} == slides and record["slides"] == len(slides) > 1
    assert all(r["pred"] in record["classes"] for r in rows)
    assert [
        [sum(1 for r in rows if (r["label"], r["pred"]) == (a, b)) for b in record["classes"]]
        for a in record["classes"]
    ] == record["confusion"]  # the record scores exactly these predictions
    # the report reads exactly this record back
    (result,) = load_results([tiny_teacher.parent])
    assert result.method == "Teacher" and result.metrics["accuracy"] == tuple(record["metrics"]["accuracy"])
    saved = json.loads((tiny_teacher.parent / "eval" / "test.json").read_text())
    assert saved["bootstrap"]["iterations"] == 200


def test_evaluate_by_slide_bootstrap_differs_from_plain(tiny_dataset, tiny_teacher, tmp_path):
    plain = evaluate_checkpoint(
        tiny_teacher, tiny_dataset["shards"], EvalOptions(split="test", iterations=300, out=str(tmp_path / "a"))
    )
    slides = evaluate_checkpoint(
        tiny_teacher,
        tiny_dataset["shards"],
        EvalOptions(split="test", iterations=300, by_slide=True, out=str(tmp_path / "b")),
    )
    assert plain["bootstrap"]["resample"] == "samples" and slides["bootstrap"]["resample"] == "slides"
    assert plain["slides"] == slides["slides"] > 1 and plain["samples"] == slides["samples"] > plain["slides"]
    for metric in ("accuracy", "f1", "precision", "recall"):
        assert plain["metrics"][metric][0] == slides["metrics"][metric][0], metric  # the same point estimate
    # tissues of one slide share its label: resampling whole slides gives another (here wider) interval
    (_, plain_low, plain_high), (_, slide_low, slide_high) = plain["metrics"]["accuracy"], slides["metrics"]["accuracy"]
    assert (plain_low, plain_high) != (slide_low, slide_high)
    assert slide_high - slide_low > plain_high - plain_low
    again = evaluate_checkpoint(
        tiny_teacher,
        tiny_dataset["shards"],
        EvalOptions(split="test", iterations=300, by_slide=True, out=str(tmp_path / "c")),
    )
    assert again["metrics"] == slides["metrics"]  # seeded: the same interval again


def test_evaluate_with_loader_workers_and_explicit_device_gives_the_same_predictions(
    tiny_dataset, tiny_teacher, tmp_path
):
    one = evaluate_checkpoint(
        tiny_teacher, tiny_dataset["shards"], EvalOptions(split="test", iterations=100, out=str(tmp_path / "a"))
    )
    two = evaluate_checkpoint(
        tiny_teacher,
        tiny_dataset["shards"],
        EvalOptions(split="test", iterations=100, out=str(tmp_path / "b"), device="cpu", workers=2),
    )
    assert (tmp_path / "a" / "test_predictions.csv").read_text() == (
        tmp_path / "b" / "test_predictions.csv"
    ).read_text()
    assert one["metrics"] == two["metrics"] and one["samples"] == two["samples"]


@pytest.mark.parametrize(
    "device, reason", [("cuda:99", "this machine has"), ("tpu", "not a device"), ("meta", "only cpu and cuda")]
)
def test_bad_device_is_one_line(tiny_dataset, tiny_teacher, tmp_path, device, reason):
    with pytest.raises(HpcdistillError, match=f"--device '{device}': {reason}"):
        evaluate_checkpoint(
            tiny_teacher,
            tiny_dataset["shards"],
            EvalOptions(split="test", iterations=10, out=str(tmp_path), device=device),
        )


def test_a_tissue_too_big_for_the_gpu_is_named(tiny_dataset):
    class OutOfMemory(torch.nn.Linear):  # unit test of the error path: no GPU here
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    manifest = read_manifest(tiny_dataset["shards"])
    with pytest.raises(
        HpcdistillError,
        match=r"^\S+_t\d{3}_w\d{3} \(\d+x\d+ px at 10x\): does not fit in GPU memory; "
        r"evaluate with --device cpu \(split 'test'\)$",
    ):
        predict_split(OutOfMemory(1, 1), tiny_dataset["shards"], manifest, "test", 10.0, mag_stats(manifest, 10.0))


def test_evaluate_bad_inputs(tiny_dataset, small_dataset, tiny_teacher, tmp_path):
    from hpcdistill.shards.sharding import ShardParams, run_sharding

    shards = tiny_dataset["shards"]
    with pytest.raises(HpcdistillError, match="split 'nope' is empty or absent"):
        evaluate_checkpoint(tiny_teacher, shards, EvalOptions(split="nope", iterations=10, out=str(tmp_path)))
    with pytest.raises(HpcdistillError, match="split 'aux1' has no labeled samples"):
        evaluate_checkpoint(tiny_teacher, shards, EvalOptions(split="aux1", iterations=10, out=str(tmp_path)))
    # real shards cut without the model's magnification
    other = tmp_path / "other"
    run_sharding(
        [small_dataset["root"] / "slides"],
        other,
        labels_csv=str(small_dataset["labels"]),
        params=ShardParams(mags=(5.0, 2.5)),
        workers=1,
        progress=False,
    )
    with pytest.raises(HpcdistillError, match=r"no 10x images \(the model's magnification\); shards have 5x, 2\.5x$"):
        evaluate_checkpoint(tiny_teacher, other, EvalOptions(split="test", iterations=10, out=str(tmp_path)))
    # a checkpoint for a different number of classes
    blob = torch.load(tiny_teacher, weights_only=True)
    blob["arch_kwargs"]["num_classes"] = 5
    wrong = tmp_path / "wrong.pt"
    torch.save(blob, wrong)
    with pytest.raises(HpcdistillError, match="trained for 5 classes, but the data has 3"):
        evaluate_checkpoint(wrong, shards, EvalOptions(split="test", iterations=10, out=str(tmp_path)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(HpcdistillError, match="garbage.pt: not a loadable weights file"):
        evaluate_checkpoint(garbage, shards, EvalOptions(split="test", iterations=10, out=str(tmp_path)))
    assert not list(tmp_path.glob("*.json"))  # no failed evaluation left a record behind


def test_method_labels_from_config():
    assert method_label({"train": {"mode": "teacher"}}) == "Teacher"
    assert method_label({"train": {"mode": "baseline"}}) == "Baseline"
    assert method_label({"train": {"mode": "finetune"}, "data": {"aux": ["aux1", "aux2"]}}) == "KD+FT (ADv2)"
    assert method_label({"train": {"mode": "distill", "pixel_resize": ["maxpool"]}, "data": {}}) == "KD+MP"
    # the order of the resize list does not change the method
    assert method_label({"train": {"mode": "distill", "pixel_resize": ["bicubic", "maxpool"]}, "data": {}}) == "KD"
    assert (
        method_label({"train": {"mode": "distill", "pixel_resize": ["maxpool", "bicubic"]}, "data": {"aux": []}})
        == "KD"
    )
    assert method_label({"train": {"mode": "distill"}, "data": {"aux": ["aux1"]}}) == "KD (ADv1)"  # as the demo
    assert method_label({"train": {"mode": "distill"}, "data": {"aux": ["aux1", "aux2"]}}) == "KD (ADv2)"
    assert method_label({"train": {"mode": "distill"}, "data": {"aux": ["extra"]}}) == "KD (extra)"
    assert method_label({"train": {"mode": "distill", "pixel_resize": ["bicubic"]}, "data": {}}) == "KD+INT"
    assert method_label({"train": {"mode": "distill", "pixel_resize": []}, "data": {}}) == "KD"


def test_methods_are_listed_teacher_baseline_kd_aux_then_the_rest():
    shuffled = ["KD+FT", "KD (aux1)", "Teacher", "KD+MP", "KD", "Baseline", "KD (aux1+aux2)"]
    assert sorted(shuffled, key=method_order) == [
        "Teacher",
        "Baseline",
        "KD",
        "KD (aux1)",
        "KD (aux1+aux2)",
        "KD+FT",
        "KD+MP",
    ]
    assert ABLATION_ORDER == ("KD", "KD+MP", "KD+INT", "KD+MP+INT")
