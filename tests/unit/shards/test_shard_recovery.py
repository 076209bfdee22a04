"""Sharding survives a full disk and a kill: completed shards kept, no partial file left, the rerun resumes to the
uninterrupted bytes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from shard_fixtures import SMALL, data_part, inject_full_disk, read_samples, tar_bytes

from hpcdistill.cli import main
from hpcdistill.common.folder_lock import LOCK
from hpcdistill.shards import cut, writer
from hpcdistill.shards.sharding import ShardingError, ShardParams, run_sharding


def test_disk_full_keeps_completed_shards_and_resumes(shard_slides, tmp_path, monkeypatch):
    real_append, calls = writer.append_sample, []

    def append_until_disk_full(archive, key, payloads):
        calls.append(key)
        if len(calls) == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(archive, key, payloads)

    monkeypatch.setattr(writer, "append_sample", append_until_disk_full)
    with pytest.raises(ShardingError) as err:
        run_sharding(
            [shard_slides["good"]],
            tmp_path,
            labels_csv=str(shard_slides["labels"]),
            params=ShardParams(**SMALL),
            progress=False,
        )
    assert "\n" not in str(err.value) and "disk full" in str(err.value) and str(tmp_path) in str(err.value)
    journal = json.loads((tmp_path / writer.JOURNAL).read_text())
    assert journal["shards"] and sorted(journal["shards"]) == sorted(tar_bytes(tmp_path))
    assert all(tar_bytes(tmp_path)[name] == tar_bytes(shard_slides["ref"])[name] for name in journal["shards"])
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / cut.SPOOL).exists()
    monkeypatch.setattr(writer, "append_sample", real_append)
    manifest = run_sharding(
        [shard_slides["good"]],
        tmp_path,
        labels_csv=str(shard_slides["labels"]),
        params=ShardParams(**SMALL),
        progress=False,
    )
    assert tar_bytes(tmp_path) == tar_bytes(shard_slides["ref"])
    assert data_part(manifest) == data_part(shard_slides["manifest"])


@pytest.mark.slow
def test_resume_after_kill_gives_the_uninterrupted_output(shard_slides, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hpcdistill.cli.main", "shard", str(shard_slides["good"]), "--out", str(out)]
    command += ["--labels", str(shard_slides["labels"]), "--shard-size", "150000", "--shard-max-samples", "1"]
    command += ["--no-progress"]
    ref = tmp_path / "ref"
    run_sharding(
        [shard_slides["good"]],
        ref,
        labels_csv=str(shard_slides["labels"]),
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
    assert [p.name for p in out.glob(".*")] == [LOCK]  # no journal or temporaries left; the unheld lock file stays
    assert tar_bytes(out) == tar_bytes(ref)
    keys = [
        m.name.split(".", 1)[0]
        for p in sorted(out.glob("*.tar"))
        for m in tarfile.open(p).getmembers()
        if m.name.endswith(".json")
    ]
    assert len(keys) == len(set(keys)) == sum(1 for _ in read_samples(ref))


def test_full_disk_while_sharding_is_one_line_leaves_no_partials_and_resumes(
    shard_slides, small_disk, tmp_path, capsys, monkeypatch
):
    out = (small_disk or tmp_path) / "out"
    args = [
        "shard",
        str(shard_slides["good"]),
        "--out",
        str(out),
        "--labels",
        str(shard_slides["labels"]),
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
    assert tar_bytes(out) == tar_bytes(shard_slides["ref"])  # the bytes of an uninterrupted run
