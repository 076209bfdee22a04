"""Shards of chosen samples, for tests that need exactly aligned pairs or special payloads: encoded by the sharder's
own `shards.sample_format` and indexed by its own manifest builder."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from hpcdistill.common.files import atomic_write_bytes
from hpcdistill.common.mags import mag_name
from hpcdistill.data.streams import StreamSpec
from hpcdistill.shards.cut import Sample, SlideResult, _add_pixel_sums
from hpcdistill.shards.manifest import MANIFEST, build_manifest, read_manifest
from hpcdistill.shards.plan import ShardParams, SlideJob, params_fingerprint
from hpcdistill.shards.reader import count_samples, raw_samples, resolve_sets
from hpcdistill.shards.sample_format import image_member, label_members, sample_key, sample_meta
from hpcdistill.shards.writer import append_sample

CLASSES = ["celiac", "duodenitis", "normal"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# ---------------------------------------------------------------------------------------------- hand-made shards


def aligned_samples(
    n: int, rng: np.random.Generator, label: int | None, *, low_size=(8, 8), vary=False, marker=False, mags=(10.0, 2.5)
) -> list[dict]:
    """One slide's samples (class id `label`, None = unlabeled) whose higher-mag images are the lowest-mag image
    upsampled by nearest neighbour: exactly aligned pairs. `marker` puts one white low-mag pixel at a random place;
    `vary` draws sizes (w, h) + {0, 2, 4}."""
    out = []
    for _ in range(n):
        w, h = low_size
        if vary:
            w, h = w + int(rng.integers(0, 3)) * 2, h + int(rng.integers(0, 3)) * 2
        low = (rng.random((h, w, 3)) * 120 + 40 + 40 * (label or 0)).astype(np.uint8)
        if marker:
            low[rng.integers(h), rng.integers(w)] = 255
        images = {}
        for m in mags:
            f = int(round(m / min(mags)))
            images[m] = low.repeat(f, 0).repeat(f, 1)
        out.append({"images": images, "label": label, "extra": {}})
    return out


def sample_payloads(
    s: dict, slide: str, patient: str, tissue: int, split: str, params: ShardParams, result: SlideResult
) -> tuple[list[tuple[str, bytes]], dict[str, list[int]]]:
    """One hand-made sample's tar members, through the sharder's own encoder; the slide's colour sums as the
    sharder keeps them (labelled train slides only)."""
    payloads, sizes = [], {}
    for mag in params.mags:
        pixels = s["images"][mag]
        sizes[mag_name(mag)] = [pixels.shape[1], pixels.shape[0]]
        if split == "train" and s["label"] is not None:
            _add_pixel_sums(result.pixel_sums.setdefault(mag_name(mag), [0.0] * 7), pixels)
        payloads.append(image_member(mag, pixels, "png", params.jpeg_quality))
    label = CLASSES[s["label"]] if s["label"] is not None else None
    meta = sample_meta(
        slide=slide,
        patient=patient,
        tissue=tissue,
        window=0,
        box_l0=[0, 0, 1, 1],
        base_mag=40.0,
        mpp=0.25,
        sizes=sizes,
        split=split,
        label=label,
    )
    return payloads + label_members(s["label"], meta) + list(s["extra"].items()), sizes


def write_handmade_shards(out: Path, shards: dict[str, list[list[dict]]], mags=(10.0, 2.5)) -> Path:
    """`shards`: split -> its shards, each a list of samples {"images": {mag: HxWx3 uint8}, "label": class id or None,
    "extra": {ext: bytes}}; one slide per shard, one tissue per sample. Samples are encoded by the sharder's own
    `shards.sample_format` (PNG payloads); the manifest is the sharder's, built from per-slide records."""
    out.mkdir(parents=True, exist_ok=True)
    params = ShardParams(mags=mags, image_format="png")
    jobs: list[SlideJob] = []
    records: dict[str, dict] = {}
    written: dict[str, dict] = {}
    for split, shard_list in shards.items():
        for index, samples in enumerate(shard_list):
            slide, name = f"{split}{index}", f"{split}-{index:06d}.tar"
            (class_id,) = {s["label"] for s in samples}  # one label per slide, as in a labels CSV
            label = CLASSES[class_id] if class_id is not None else None
            job = SlideJob(f"/slides/{slide}.svs", slide, f"patient-{slide}", label, class_id, split)
            result = SlideResult(slide, "ok", None, split, 40.0, "test", tissues=len(samples))
            with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as archive:
                for tissue, s in enumerate(samples):
                    key = sample_key(slide, tissue, 0)
                    payloads, sizes = sample_payloads(s, slide, job.patient, tissue, split, params, result)
                    append_sample(archive, key, payloads)
                    result.samples.append(Sample(key, [], sizes, tissue))
            jobs.append(job)
            records[slide] = result.record(job)
            written[name] = {
                "split": split,
                "bytes": (out / name).stat().st_size,
                "keys": [x.key for x in result.samples],
            }
    jobs.sort(key=lambda j: j.slide)
    fingerprint = params_fingerprint(params, [Path(j.path) for j in jobs], None)
    manifest = build_manifest(params, fingerprint, CLASSES, jobs, records, written, out.name)
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return out


def handmade(out: Path, splits: dict[str, list[int]], seed: int = 0, **kw) -> Path:
    """Shards of aligned samples: split -> samples per shard (one slide per shard, its class drawn at random)."""
    rng = np.random.default_rng(seed)
    return write_handmade_shards(
        out,
        {
            split: [aligned_samples(n, rng, int(rng.integers(len(CLASSES))), **kw) for n in counts]
            for split, counts in splits.items()
        },
    )


def spec(shards: Path, split: str, **kw) -> StreamSpec:
    """An ordered, unaugmented paired 2.5x/10x stream over a split, standardised with the manifest's stats."""
    manifest = read_manifest(shards)
    base = dict(
        urls=resolve_sets(shards, manifest, [split]).urls,
        mode="paired",
        mag=2.5,
        teacher_mag=10.0,
        stats=manifest["stats"],
        micro_batch=1,
        samples=-1,
        sampler="ordered",
    )
    base.update(kw)
    return StreamSpec(**base)


def keys(stream) -> list[list[str]]:
    return [b["key"] for b in stream]


def split_keys(shards: Path, split: str) -> list[str]:
    """The split's sample keys in shard order, read straight from the tars."""
    urls = resolve_sets(shards, read_manifest(shards), [split]).urls
    return [raw["__key__"] for raw in raw_samples(urls)]


def shard_counts(shards: Path, split: str) -> list[int]:
    return [count_samples(url) for url in resolve_sets(shards, read_manifest(shards), [split]).urls]
