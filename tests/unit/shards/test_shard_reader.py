"""Reading shard tars safely: pickles never decoded, missing pieces named, the lean member reader against
webdataset's and tarfile's, corrupt and cut headers refused in one line."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from handmade_shards import aligned_samples, spec, write_handmade_shards

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.data.streams import ShardStream
from hpcdistill.shards.manifest import read_manifest
from hpcdistill.shards.reader import raw_samples, resolve_sets, tar_members

CLASSES = ["celiac", "duodenitis", "normal"]
STATS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_pickles_in_shards_are_never_decoded(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    blob = pickle.dumps(Evil())
    samples = aligned_samples(3, np.random.default_rng(0), 1)
    for s in samples:
        s["extra"] = {"pyd": blob, "pth": blob, "pickle": blob}
    shards = write_handmade_shards(tmp_path / "s", {"train": [samples]})
    raw = next(raw_samples(resolve_sets(shards, read_manifest(shards), ["train"]).urls))
    assert raw["pyd"] == raw["pth"] == raw["pickle"] == blob  # the payloads really are in the shard
    batches = list(ShardStream(spec(shards, "train", mode="labeled")))
    assert len(batches) == 3 and not marker.exists()
    assert set(batches[0]) == {"key", "slide", "tissue", "area", "y", "x"}


def test_missing_pieces_are_named(small_dataset, tmp_path):
    shards, manifest = small_dataset["shards"], small_dataset["manifest"]
    aux = manifest["splits"]["aux1"]
    with pytest.raises(HpcdistillError, match=r"aux1-000000\.tar: sample \S+_t\d{3}_w\d{3} has no cls label"):
        list(ShardStream(spec(shards, "aux1", mode="labeled")))
    with pytest.raises(HpcdistillError, match=r"has no 1\.25x image \(has 10x\.jpg, 2\.5x\.jpg, 5x\.jpg, json\)"):
        list(ShardStream(spec(shards, "aux1", mode="unlabeled", mag=1.25)))
    with pytest.raises(HpcdistillError, match=r"nope-000000\.tar: shard not found"):
        resolve_sets(shards, manifest, ["nope-{000000..000001}.tar"])
    with pytest.raises(HpcdistillError, match="manifest not found"):
        read_manifest(tmp_path / "empty")
    # unlabeled paired samples carry y = -1
    assert [int(b["y"][0]) for b in ShardStream(spec(shards, "aux1"))] == [-1] * aux["samples"]
    # a brace pattern counts its samples from the tar headers, as the manifest counted them
    assert resolve_sets(shards, manifest, ["aux1-{000000..000000}.tar"]).samples == aux["samples"]
    train = manifest["splits"]["train"]
    pattern = f"train-{{000000..{len(train['shards']) - 1:06d}}}.tar"
    assert resolve_sets(shards, manifest, [pattern]).samples == train["samples"]


def webdataset_members(path: Path) -> list[tuple]:
    from webdataset.tariterators import tar_file_expander, url_opener

    return [(m["fname"], m["data"], m["__url__"]) for m in tar_file_expander(url_opener([{"url": str(path)}])) if m]


def test_tar_members_read_the_sharders_tars_as_webdataset_does(small_dataset):
    for url in resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train", "val"]).urls:
        ours = [(m["fname"], m["data"], m["__url__"]) for m in tar_members(url)]
        assert ours and ours == webdataset_members(Path(url))


def test_tar_members_hand_other_tar_layouts_to_tarfile(small_dataset, tmp_path):
    """pax and GNU tars (long names from the 5th member on, a folder first) and a gzipped tar: the same members as
    webdataset reads."""
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        members = [(m, source.extractfile(m).read()) for m in source.getmembers()]
    layouts = []
    for name, form in (("pax.tar", tarfile.PAX_FORMAT), ("gnu.tar", tarfile.GNU_FORMAT)):
        layouts.append(tmp_path / name)
        with tarfile.open(layouts[-1], "w", format=form) as out:
            folder = tarfile.TarInfo("folder")
            folder.type = tarfile.DIRTYPE
            out.addfile(folder)
            for index, (member, streams) in enumerate(members):
                info = tarfile.TarInfo(("long/" * 30 if index >= 4 else "") + member.name)
                info.size = len(streams)
                out.addfile(info, io.BytesIO(streams))
    layouts.append(tmp_path / "zipped.tar.gz")
    layouts[-1].write_bytes(gzip.compress(Path(url).read_bytes()))
    for path in layouts:
        ours = [(m["fname"], m["data"], m["__url__"]) for m in tar_members(str(path))]
        assert len(ours) == len(members) and ours == webdataset_members(path), path.name


def test_a_corrupt_member_header_is_one_line_naming_the_shard(small_dataset, tmp_path):
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        members = source.getmembers()
    keys = [m.name.split(".")[0] for m in members]
    middle = members[keys.index(keys[-1])].offset  # the last sample's first header: whole samples before it
    bad = tmp_path / "bad.tar"
    raw = bytearray(Path(url).read_bytes())
    raw[middle + 130] ^= 0x04  # one flipped bit in the size field: the header checksum no longer matches
    bad.write_bytes(bytes(raw))
    with pytest.raises(HpcdistillError, match=rf"^{bad}: truncated or corrupt shard \(.*\); last good sample: ") as err:
        list(raw_samples([str(bad)]))
    assert "last good sample: none" not in str(err.value)  # the samples before the bad header were read


def test_a_shard_cut_inside_a_member_header_is_refused(small_dataset, tmp_path):
    url = resolve_sets(small_dataset["shards"], small_dataset["manifest"], ["train"]).urls[0]
    with tarfile.open(url) as source:
        second = source.getmembers()[1].offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(Path(url).read_bytes()[: second + 100])
    with pytest.raises(HpcdistillError, match=r"truncated or corrupt shard \(unexpected end of data\)"):
        list(raw_samples([str(cut)]))
