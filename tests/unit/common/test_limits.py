"""The readers of untrusted input (common/limits.py): regular files only, never past the byte limit whatever `stat`
says, JSON depth counted outside strings with JSON's escapes, and each limit raised by its environment variable."""

from __future__ import annotations

import json
import os

import pytest

from hpcdistill.common.errors import HpcdistillError
from hpcdistill.common.limits import json_depth_ok, limit, read_bounded, regular_file


def test_only_regular_files_are_read_and_never_past_the_limit(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(HpcdistillError, match="is a FIFO \\(named pipe\\), not a regular file"):
        read_bounded(fifo, "csv_bytes", HpcdistillError)  # opened non-blocking: refused, not waited on
    with pytest.raises(HpcdistillError, match="is a character device"):
        read_bounded("/dev/zero", "csv_bytes", HpcdistillError)
    with pytest.raises(HpcdistillError, match="is a folder"):
        regular_file(tmp_path, HpcdistillError)
    big = tmp_path / "big.csv"
    big.write_bytes(b"x" * 5000)
    monkeypatch.setenv("HPCDISTILL_MAX_CSV_BYTES", "4096")
    assert limit("csv_bytes") == 4096
    with pytest.raises(HpcdistillError, match="larger than 4,096 bytes .*HPCDISTILL_MAX_CSV_BYTES raises the limit"):
        read_bounded(big, "csv_bytes", HpcdistillError)
    monkeypatch.setenv("HPCDISTILL_MAX_CSV_BYTES", "5000")
    assert read_bounded(big, "csv_bytes", HpcdistillError) == b"x" * 5000
    monkeypatch.setenv("HPCDISTILL_MAX_CSV_BYTES", "lots")
    with pytest.raises(HpcdistillError, match="HPCDISTILL_MAX_CSV_BYTES='lots': expected a positive integer"):
        limit("csv_bytes")


def test_json_depth_counts_brackets_outside_strings_only():
    strings = {"a": ["[[[[", {"b": "\\", "c": '"[[['}], "d": '\\\\\\"[[{{' * 40}
    json_depth_ok(json.dumps(strings).encode(), "x", HpcdistillError)  # brackets in strings, escapes of escapes
    json_depth_ok(("[" * 64 + "]" * 64).encode(), "x", HpcdistillError)
    with pytest.raises(HpcdistillError, match="x: JSON nested 65 levels deep"):
        json_depth_ok(("[" * 65 + "]" * 65).encode(), "x", HpcdistillError)
    tricky = b'{"a": "\\\\", "b": ' + b"[" * 70 + b"]" * 70 + b"}"  # an escaped backslash ends the string
    with pytest.raises(HpcdistillError, match="JSON nested 71 levels deep"):
        json_depth_ok(tricky, "x", HpcdistillError)
