"""`evaluate` on a real engine checkpoint and real shards: record, predictions, GFLOPs and bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from hpcdistill.errors import HpcdistillError
from hpcdistill.evaluation import evaluate_checkpoint, method_label
from hpcdistill.report import load_results


def test_evaluate_writes_record_and_predictions(tiny_dataset, tiny_teacher):
    record = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=200)
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
    assert len(rows) == record["samples"] and all(r["slide"] and "." not in r["key"] for r in rows)
    # the report reads exactly this record back
    (result,) = load_results([tiny_teacher.parent])
    assert result.method == "Teacher" and result.metrics["accuracy"] == tuple(record["metrics"]["accuracy"])
    saved = json.loads((tiny_teacher.parent / "eval" / "test.json").read_text())
    assert saved["bootstrap"]["iterations"] == 200


def test_evaluate_by_slide_bootstrap_differs_from_plain(tiny_dataset, tiny_teacher, tmp_path):
    plain = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=300, out_dir=tmp_path / "a")
    slides = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=300, by_slide=True,
                                 out_dir=tmp_path / "b")
    assert plain["metrics"]["accuracy"][0] == slides["metrics"]["accuracy"][0]
    assert slides["bootstrap"]["resample"] == "slides"


def test_evaluate_with_loader_workers_and_explicit_device_gives_the_same_predictions(tiny_dataset, tiny_teacher,
                                                                                    tmp_path):
    one = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=100, out_dir=tmp_path / "a")
    two = evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=100, out_dir=tmp_path / "b",
                              device="cpu", workers=2)
    assert (tmp_path / "a" / "test_predictions.csv").read_text() == (tmp_path / "b" / "test_predictions.csv").read_text()
    assert one["metrics"] == two["metrics"] and one["samples"] == two["samples"]


@pytest.mark.parametrize("device, reason", [("cuda:99", "this machine has"), ("tpu", "not a device"),
                                            ("meta", "only cpu and cuda")])
def test_bad_device_is_one_line(tiny_dataset, tiny_teacher, tmp_path, device, reason):
    with pytest.raises(HpcdistillError, match=f"--device '{device}': {reason}"):
        evaluate_checkpoint(tiny_teacher, tiny_dataset["shards"], "test", iterations=10, out_dir=tmp_path,
                            device=device)


def test_a_tissue_too_big_for_the_gpu_is_named(tiny_dataset):
    from hpcdistill.data import read_manifest
    from hpcdistill.evaluation import predict_split

    class OutOfMemory(torch.nn.Linear):  # unit test of the error path: no GPU here
        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    manifest = read_manifest(tiny_dataset["shards"])
    with pytest.raises(HpcdistillError, match=r"^\S+_t\d+_w\d+ \(\d+x\d+ px at 10x, split 'test'\): does not fit in "
                                              r"GPU memory; evaluate with --device cpu$"):
        predict_split(OutOfMemory(1, 1), tiny_dataset["shards"], manifest, "test", 10.0)


def test_evaluate_bad_inputs(tiny_dataset, tiny_teacher, tmp_path):
    shards = tiny_dataset["shards"]
    with pytest.raises(HpcdistillError, match="split 'nope' is empty or absent"):
        evaluate_checkpoint(tiny_teacher, shards, "nope", iterations=10, out_dir=tmp_path)
    with pytest.raises(HpcdistillError, match="split 'aux1' has no labeled samples"):
        evaluate_checkpoint(tiny_teacher, shards, "aux1", iterations=10, out_dir=tmp_path)
    # shards without the model's magnification
    manifest = json.loads((shards / "manifest.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest["mags"] = [2.5, 1.25]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HpcdistillError, match=r"no 10x images \(the model's magnification\)"):
        evaluate_checkpoint(tiny_teacher, other, "test", iterations=10, out_dir=tmp_path)
    # a checkpoint for a different number of classes
    blob = torch.load(tiny_teacher, weights_only=True)
    blob["arch_kwargs"]["num_classes"] = 5
    wrong = tmp_path / "wrong.pt"
    torch.save(blob, wrong)
    with pytest.raises(HpcdistillError, match="trained for 5 classes, but the data has 3"):
        evaluate_checkpoint(wrong, shards, "test", iterations=10, out_dir=tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(HpcdistillError, match="garbage.pt: not a loadable weights file"):
        evaluate_checkpoint(garbage, shards, "test", iterations=10, out_dir=tmp_path)


def test_method_labels_from_config():
    assert method_label({"train": {"mode": "baseline"}}) == "Baseline"
    assert method_label({"train": {"mode": "distill", "pixel_resize": ["maxpool", "bicubic"]}, "data": {"aux": []}}) == "KD"
    assert method_label({"train": {"mode": "distill"}, "data": {"aux": ["aux1"]}}) == "KD (aux1)"
    assert method_label({"train": {"mode": "distill", "pixel_resize": ["bicubic"]}, "data": {}}) == "KD+INT"
    assert method_label({"train": {"mode": "distill", "pixel_resize": []}, "data": {}}) == "KD"
