"""What the shard tests share: a session-wide set of synthetic slides (good and bad) with its reference
sharding, a small real disk to fill, and readers of the output."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tifffile
import webdataset as wds
from PIL import Image

from hpcdistill.shards.sharding import ShardParams, run_sharding
from hpcdistill.slides import tissue
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


@pytest.fixture(scope="session")
def shard_slides(tmp_path_factory) -> dict:
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
            good / f"{name}.{fmt}",
            synthetic.SlideSpec(*size, fmt=fmt, base_mag=mag, mpp=mpp, class_id=cls, seed=seed, tissues=2),
        )
    labels = root / "labels.csv"
    labels.write_text(LABELS)
    bad = root / "bad"
    bad.mkdir()
    write_blank_tiff(bad / "blank.tiff")
    synthetic.write_slide(
        bad / "nomag.tiff", synthetic.SlideSpec(1536, 1024, fmt="tiff", base_mag=40, seed=7, with_metadata=False)
    )
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


@pytest.fixture
def small_disk(shard_slides, tmp_path):
    """A real tmpfs holding about half of the reference output when the tests run as root (as CI does); None where
    mounting is not allowed, and the test then injects the full disk where libvips and the tar writer see it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    size = sum(p.stat().st_size for p in shard_slides["ref"].rglob("*") if p.is_file()) // 2 // 4096 * 4096
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


def data_part(manifest: dict) -> dict:
    """A manifest without what says how and where it was made (its provenance, the folder's name): what two runs
    over the same inputs must agree on."""
    return {k: v for k, v in manifest.items() if k not in ("provenance", "name")}
