"""The progress a run reports (progress.json) and how a launch shows it: in place on a TTY, line by line otherwise."""

from __future__ import annotations

import io
import time

from hpcdistill.common.progress import LiveStatus, describe, duration, read_progress, write_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def entry(tmp_path, *names, state=None):
    tasks = []
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        tasks.append({"name": name, "run_dir": str(tmp_path / name), "state": state})
    return {"key": "kd", "kind": "method", "started": time.time(), "tasks": tasks}


def progress(step, epoch, phase="train", eta=65.0):
    return {
        "mode": "distill",
        "phase": phase,
        "epoch": epoch,
        "epochs": 4,
        "step": step,
        "steps": 40,
        "eta_s": eta,
        "updated": time.time(),
    }


def test_progress_round_trips_and_reads_as_one_phrase(tmp_path):
    assert read_progress(tmp_path) is None and describe(None) == "-"
    write_progress(tmp_path, progress(12, 1))
    assert describe(read_progress(tmp_path)) == "epoch 2/4, step 12/40, ETA 1m05s"
    assert describe(progress(20, 1, "validate")) == "validating, epoch 2/4, step 20/40, ETA 1m05s"
    assert describe(progress(40, 4, "done", None)) == "done at step 40/40"
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_not_a_tty_prints_a_line_per_task_every_tenth_of_its_steps(tmp_path):
    job, out = entry(tmp_path, "kd-2.5x", "kd-1.25x"), io.StringIO()
    pending = entry(tmp_path, "later", state="PENDING")
    display = LiveStatus(out)
    display.update([job, pending])  # nothing reported yet; a pending task is not shown
    write_progress(tmp_path / "kd-2.5x", progress(5, 0))
    display.update([job])
    write_progress(tmp_path / "kd-2.5x", progress(6, 0))  # the same tenth: no new line
    display.update([job])
    job["tasks"][1]["state"] = "COMPLETED"
    display.update([job])
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  kd: kd-2.5x  running ") and lines[1].startswith("  kd: kd-1.25x  running ")
    assert lines[2:] == ["  kd: kd-2.5x  epoch 1/4, step 5/40, ETA 1m05s", "  kd: kd-1.25x  completed"]
    assert "\x1b" not in out.getvalue() and "later" not in out.getvalue()  # plain lines in logs


def test_a_tty_redraws_the_lines_in_place(tmp_path):
    job, out = entry(tmp_path, "a", "b"), Terminal()
    display = LiveStatus(out)
    write_progress(tmp_path / "a", progress(5, 0))
    display.update([job])
    display.update([job])
    first, second = out.getvalue().split("\x1b[2F")  # the second draw moves up over the first one's 2 lines
    assert first.count("\x1b[2K") == second.count("\x1b[2K") == 2 and "kd: a  epoch 1/4, step 5/40" in second
    display.close()
    display.update([job])
    assert out.getvalue().count("\x1b[2F") == 1  # after close, what comes next draws below
