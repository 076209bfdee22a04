"""Reading shard tars safely: which tars a set names (split names via the manifest, or brace patterns), their
sample counts, undecoded samples in order with truncation refused, and decoding that never unpickles."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, tar_file_iterator, url_opener

from hpcdistill.common.errors import DataError, one_line

IMAGE_EXTS = ("jpg", "png")
TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # a tar ends with two zero blocks: a file cut anywhere, even between members, lacks them
_ZERO_BLOCK = bytes(TAR_BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names too


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]  # concrete shard paths/URLs in a fixed order
    samples: int  # total samples in them

    @staticmethod
    def combine(sets: list[ShardSet]) -> ShardSet:
        """Several sets read together, in the given order."""
        return ShardSet([u for s in sets for u in s.urls], sum(s.samples for s in sets))


def resolve_sets(shards_dir: str | Path, manifest: dict[str, Any], entries: list[str]) -> ShardSet:
    """Split names ("train", "aux1") via the manifest; anything else is a brace pattern, relative to shards_dir."""
    urls: list[str] = []
    samples = 0
    splits = manifest.get("splits", {})
    for entry in entries:
        if entry in splits:
            info = splits[entry]
            urls += [str(Path(shards_dir) / name) for name in info.get("shards", [])]
            samples += int(info.get("samples", 0))
            continue
        expanded = [u if "://" in u or Path(u).is_absolute() else str(Path(shards_dir) / u) for u in braceexpand(entry)]
        for url in expanded:
            if "://" not in url and not Path(url).exists():
                raise DataError(f"{url}: shard not found (from set entry {entry!r}; known splits: {', '.join(splits)})")
            samples += count_samples(url)
        urls += expanded
    return ShardSet(urls, samples)


def count_samples(url: str) -> int:
    """Distinct keys in a local tar, from its headers only (tarfile seeks past the data)."""
    if "://" in url:
        raise DataError(f"{url}: remote shards must be named by split in the manifest (their counts come from it)")
    check_tar_end(url, None)
    keys = set()
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.split("/")[-1].split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as err:
        raise _shard_error(url, err, None) from None
    return len(keys)


def _shard_error(url: str, err: BaseException | str, last_key: str | None) -> DataError:
    reason = err
    if not isinstance(err, str):  # webdataset appends the stream and url to the exception's args
        first = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
        reason = one_line(first.split(" @ <")[0]) or type(err).__name__
    return DataError(
        f"{url}: truncated or corrupt shard ({reason}); last good sample: {last_key or 'none'}. "
        "Restore the file, or shard the slides again into a new folder"
    )


def check_tar_end(url: str, last_key: str | None) -> None:
    """Refuse a local tar without its end-of-archive blocks. tarfile's stream reader ends quietly when a file is
    cut exactly between members, so without this check a truncated shard would read as a shorter one."""
    if "://" in url:
        return  # a remote stream has no size to check; its reader still fails on a cut inside a member
    try:
        size = os.path.getsize(url)
        with open(url, "rb") as handle:
            handle.seek(max(0, size - TAR_END))
            tail = handle.read(TAR_END)
    except OSError as err:
        raise DataError(f"{url}: cannot read shard ({err.strerror or err})") from None
    if size < TAR_END or size % TAR_BLOCK or tail.count(0) != TAR_END:
        raise _shard_error(url, f"{size} bytes, no end-of-archive marker", last_key)


def raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Undecoded samples (bytes per extension) from tars, in order; a truncated or corrupt tar raises a DataError
    naming it and its last good sample."""
    for url in urls:
        local = "://" not in url
        if local and not os.path.isfile(url):
            raise DataError(f"{url}: shard not found")
        members = tar_members(url) if local else tar_file_expander(url_opener([{"url": url}]))
        last_key, held = None, None
        try:
            for sample in group_by_keys(members):
                if held is not None:
                    yield held
                    last_key = held["__key__"]
                held = sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            raise _shard_error(url, err, last_key) from None
        check_tar_end(url, last_key)  # before the last sample: a cut between its members leaves it incomplete
        if held is not None:
            yield held


def tar_members(path: str) -> Iterator[dict[str, Any]]:
    """{fname, data, __url__} per regular file of a local tar, as webdataset's tar_file_expander yields them, at a
    fraction of tarfile's per-member cost (the loader's largest cost after JPEG decoding): a plain USTAR header
    (the sharder's) is parsed here, name, size, type and checksum; from the first header that is anything else
    (compression, pax or GNU long names, a bad checksum) tarfile reads the rest and raises what it raises."""
    with open(path, "rb") as handle:
        while True:
            at = handle.tell()
            header = handle.read(TAR_BLOCK)
            if not header or header == _ZERO_BLOCK:
                return  # end of archive, or of a file cut between members (check_tar_end refuses that)
            if len(header) < TAR_BLOCK:
                raise tarfile.ReadError("unexpected end of data")
            parsed = _ustar_header(header)
            if parsed is None:
                handle.seek(at)
                for member in tar_file_iterator(handle):
                    member["__url__"] = path
                    yield member
                return
            name, size, regular = parsed
            data = handle.read(size)
            if len(data) < size:
                raise tarfile.ReadError("unexpected end of data")
            handle.seek(-size % TAR_BLOCK, os.SEEK_CUR)
            if regular and not _SKIP_META.match(name):
                yield {"fname": name, "data": data, "__url__": path}


def _ustar_header(header: bytes) -> tuple[str, int, bool] | None:
    """(name, data size, is a regular file) of a plain USTAR member header, a file or a folder; None for anything
    tarfile must read (pax and GNU headers, links, sparse files, base-256 sizes, a bad checksum, no magic)."""
    kind = header[156:157]
    if header[257:263] != b"ustar\0" or kind not in (b"0", b"\0", b"7", b"5") or header[124] & 0x80:
        return None
    try:
        stored, size = int(header[148:156].strip(b"\0 ") or b"-1", 8), int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the checksum field counts as 8 spaces
        return None
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    full = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")  # tarfile's decoding
    return full, size, kind != b"5"


def decode_image(blob: bytes | memoryview | np.ndarray) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 (H, W, 3) RGB with PIL (libjpeg-turbo): one pixel copy, as bare WebDataset decoding
    makes; flips, rotations and standardisation happen where the batch lands (device_batch.py)."""
    img = Image.open(io.BytesIO(blob))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    pixels = np.frombuffer(img.tobytes(), np.uint8).reshape(h, w, 3)
    with warnings.catch_warnings():  # read-only bytes: nothing writes into a loader image in place
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels)


def check_jpeg(blob: bytes, where: str) -> None:
    """The only check of bytes the loader does not decode (`data.decode: gpu`): a JPEG starts with SOI and ends
    with EOI. A payload cut short fails here, in one line, instead of decoding to a partly grey tissue."""
    if blob[:2] != b"\xff\xd8" or blob[-2:] != b"\xff\xd9":
        raise DataError(
            f"{where}: not a complete JPEG (no start or end marker); the shard is corrupt "
            "(data.decode: gpu reads JPEG shards only)"
        )


def decode_sample(raw: dict[str, Any], wanted: list[str], encoded: bool = False) -> dict[str, Any]:
    """Decode only what is asked for: images as uint8 (H, W, 3) tensors (or, `encoded`, their checked JPEG bytes as
    a 1-D uint8 tensor, for decoding on the GPU), 'cls' as int, 'json' as a dict. Never unpickles. A payload that
    does not decode is a DataError naming the shard, the sample and the payload."""
    key = raw.get("__key__", "?")
    out: dict[str, Any] = {"__key__": key}
    for name in wanted:
        try:
            if name == "cls":
                if "cls" in raw:
                    out["cls"] = int(raw["cls"].decode("ascii").strip())
                continue
            if name == "json":
                out["json"] = json.loads(raw["json"]) if "json" in raw else {}
                continue
            blob = next((raw[f"{name}.{ext}"] for ext in IMAGE_EXTS if f"{name}.{ext}" in raw), None)
            if blob is None:
                have = sorted(k for k in raw if not k.startswith("__"))
                raise DataError(f"{raw.get('__url__', '?')}: sample {key} has no {name} image (has {', '.join(have)})")
            if encoded:
                check_jpeg(blob, f"{raw.get('__url__', '?')}: sample {key}: its {name}")
                out[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            else:
                out[name] = decode_image(blob)
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 -- PIL and the codecs raise many types for corrupt bytes
            raise DataError(
                f"{raw.get('__url__', '?')}: sample {key}: its {name} cannot be decoded "
                f"({type(err).__name__}: {one_line(err, 200)}); the shard is corrupt"
            ) from None
    return out


def sample_size(raw: dict[str, Any], mag: str) -> tuple[int, int]:
    """(w, h) at `mag` from the json metadata, without decoding the image (for size bucketing)."""
    try:
        w, h = json.loads(raw["json"])["sizes"][mag]
        return int(w), int(h)
    except (KeyError, ValueError, TypeError):
        return 0, 0
