"""Shared test set-up: CPU DeepSpeed, one thread per process (2-core CI machines)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed compiles a small shm op on first init; cache it across tests and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

import pytest  # noqa: E402

TINY_MAGS = (10.0, 2.5, 1.25)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """Real synthetic slides (SVS 40x/20x and pyramidal TIFF) sharded by the real sharder: the shared test data."""
    from hpcdistill.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic import write_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    slides, labels = write_dataset(root / "slides", n_slides_per_split={"train": 6, "val": 3, "test": 3},
                                   n_aux1=2, n_aux2=2, size=(1536, 1152), seed=0)
    manifest = run_sharding([root / "slides"], root / "shards", labels_csv=str(labels),
                            params=ShardParams(mags=TINY_MAGS), workers=1, progress=False)
    return {"root": root, "slides": slides, "labels": labels, "shards": root / "shards", "manifest": manifest}


def tiny_train_overrides(shards: Path, out: Path, name: str, mode: str, mag: float = 10.0) -> list[str]:
    """A few-second CPU training run on the tiny dataset."""
    return [
        f"run.out_dir={out}", f"run.name={name}", f"data.shards={shards}", f"data.mag={mag}",
        "model.arch=resnet10", "model.width=8", "model.groups=4", "model.num_classes=3",
        "train.epochs=1", "train.grad_accum=2", f"train.mode={mode}", "log.progress=false",
        "deepspeed=configs/deepspeed/fp32.json", "model.stem=" + ("standard" if mode == "teacher" else "lowres"),
    ]


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset, tmp_path_factory) -> Path:
    """A teacher trained by the real engine on the real tiny shards; returns its exported best.pt."""
    from hpcdistill import engine
    from hpcdistill.config import load_config

    out = tmp_path_factory.mktemp("tiny_runs")
    summary = engine.run(load_config(None, tiny_train_overrides(tiny_dataset["shards"], out, "teacher", "teacher")))
    return Path(summary["best_path"])
