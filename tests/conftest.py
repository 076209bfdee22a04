"""Shared test set-up: CPU DeepSpeed, one thread per process (2-core CI machines)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# hpcdistill keeps DeepSpeed from JIT-building its CPU shm op (distributed.skip_shm_comm_build); should another op
# ever be built, it is cached across tests and runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))

import numpy as np  # noqa: E402  (after the environment above)
import pytest  # noqa: E402
import tifffile  # noqa: E402

TINY_MAGS = (10.0, 2.5, 1.25)
TILE = 256


def tiles(image: np.ndarray, tile: int = TILE):
    """Row-major tiles, edge tiles padded with white (what tifffile expects from a tile iterator)."""
    height, width = image.shape[:2]
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            block = np.full((tile, tile, 3), 255, np.uint8)
            part = image[y : y + tile, x : x + tile]
            block[: part.shape[0], : part.shape[1]] = part
            yield block


def write_svs(
    path: Path, image: np.ndarray, *, app_mag: float = 20, mpp: float = 0.499, level1=None, level_subfiletype: int = 0
) -> None:
    """Aperio layout: tiled JPEG baseline, stripped thumbnail, tiled /4 level, stripped label and macro."""
    height, width = image.shape[:2]
    head = f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    meta = f"|AppMag = {app_mag:g}|MPP = {mpp:.4f}"
    level1 = image[::4, ::4].copy() if level1 is None else level1
    common = dict(photometric="rgb", metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            tiles(image),
            shape=image.shape,
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            description=f"{head} JPEG/RGB Q=90{meta}",
            **common,
        )
        thumb = np.ascontiguousarray(image[::8, ::8])
        tw.write(
            thumb, compression="jpeg", description=f"{head} -> {thumb.shape[1]}x{thumb.shape[0]} - {meta}", **common
        )
        tw.write(
            tiles(level1),
            shape=level1.shape,
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="jpeg",
            subfiletype=level_subfiletype,
            description=f"{head} -> {level1.shape[1]}x{level1.shape[0]} - {meta}",
            **common,
        )
        tw.write(
            np.full((60, 80, 3), 200, np.uint8),
            compression="lzw",
            subfiletype=1,
            description="Aperio Image Library v12.0.0\r\nlabel 80x60",
            **common,
        )
        tw.write(
            np.full((60, 160, 3), 180, np.uint8),
            compression="jpeg",
            subfiletype=9,
            description="Aperio Image Library v12.0.0\r\nmacro 160x60",
            **common,
        )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict:
    """Real synthetic slides (SVS 40x/20x and pyramidal TIFF) sharded by the real sharder: the shared test data."""
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    root = tmp_path_factory.mktemp("tiny_dataset")
    slides, labels = write_dataset(
        root / "slides",
        DatasetSpec(slides_per_split={"train": 6, "val": 3, "test": 3}, aux1=2, aux2=2, size=(1536, 1152), seed=0),
    )
    manifest = run_sharding(
        [root / "slides"],
        root / "shards",
        labels_csv=str(labels),
        params=ShardParams(mags=TINY_MAGS),
        workers=1,
        progress=False,
    )
    return {"root": root, "slides": slides, "labels": labels, "shards": root / "shards", "manifest": manifest}


SMALL_MAGS = (10.0, 5.0, 2.5)
SMALL_SHARD_SAMPLES = 4


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> dict:
    """A smaller real dataset, for jobs run many times (launches, SLURM) and loader tests that need several shards
    per split: 3/3/3 labeled slides + 1 aux1 at 768x576 (40x), mags 10, 5 and 2.5 (the launcher tests' [5, 2.5]),
    the real sharder capped at SMALL_SHARD_SAMPLES samples per shard, so splits span uneven shards. Same dict as
    `tiny_dataset`."""
    from hpcdistill.shards.sharding import ShardParams, run_sharding
    from hpcdistill.synthetic.dataset import write_dataset
    from hpcdistill.synthetic.specs import DatasetSpec

    root = tmp_path_factory.mktemp("small_dataset")
    slides, labels = write_dataset(
        root / "slides",
        DatasetSpec(slides_per_split={"train": 3, "val": 3, "test": 3}, aux1=1, aux2=0, size=(768, 576), seed=0),
    )
    params = ShardParams(mags=SMALL_MAGS, shard_max_samples=SMALL_SHARD_SAMPLES)
    manifest = run_sharding(
        [root / "slides"], root / "shards", labels_csv=str(labels), params=params, workers=1, progress=False
    )
    return {"root": root, "slides": slides, "labels": labels, "shards": root / "shards", "manifest": manifest}


def tiny_train_overrides(shards: Path, out: Path, name: str, mode: str, mag: float = 10.0) -> list[str]:
    """A few-second CPU training run on the tiny dataset."""
    return [
        f"run.out_dir={out}",
        f"run.name={name}",
        f"data.shards={shards}",
        f"data.mag={mag}",
        "model.arch=resnet10",
        "model.width=8",
        "model.groups=4",
        "model.num_classes=3",
        "train.epochs=1",
        "train.grad_accum=2",
        f"train.mode={mode}",
        "log.progress=false",
        "model.stem=" + ("standard" if mode == "teacher" else "lowres"),
        "teacher.min_val_accuracy=0",  # the tiny teachers train for seconds: the gate has its own tests
    ]


def cfg_for(dataset: dict, out: Path, name: str, mode: str, mag: float, *extra: str):
    """The tiny training config for `dataset` (the tiny_dataset fixture), logging every step, plus `extra` overrides."""
    from hpcdistill.config.loading import load_config

    overrides = tiny_train_overrides(dataset["shards"], out, name, mode, mag) + ["log.log_every=1"]
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="session")
def tiny_teacher(tiny_dataset, tmp_path_factory) -> Path:
    """A teacher trained by the real engine on the real tiny shards; returns its exported best.pt."""
    from hpcdistill.config.loading import load_config
    from hpcdistill.train import loop

    out = tmp_path_factory.mktemp("tiny_runs")
    summary = loop.run(load_config(None, tiny_train_overrides(tiny_dataset["shards"], out, "teacher", "teacher")))
    return Path(summary["best_path"])


# ---- the `slurm_cluster` fixture: the real local SLURM from slurm/cluster.sh ----
REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "cluster.sh"
# What `slurm/cluster.sh install` (apt) provides; without them the cluster cannot start.
SLURM_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "munged", "mariadbd")


@dataclass(frozen=True)
class SlurmCluster:
    """Handle on the running local cluster; SLURM_CONF is exported for the whole session."""

    state_dir: Path
    slurm_conf: Path


def _path_with_sbin() -> str:
    """PATH plus the sbin folders, where Debian puts the daemons (a non-login root shell may lack them)."""
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "local SLURM tests need root (slurm/cluster.sh runs the daemons as root)"
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=_path_with_sbin()) is None]
    if missing:
        return f"SLURM packages not installed (missing {', '.join(missing)}); run: sudo slurm/cluster.sh install"
    return None


def _cluster(cmd: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SH), cmd], env=env, text=True, capture_output=True, timeout=timeout)


def _live_sessions(sessions: Path) -> list[Path]:
    """Session marker files (named by pid) of test sessions still alive; stale ones are removed."""
    live = []
    for marker in sessions.glob("*"):
        try:
            os.kill(int(marker.name), 0)
            live.append(marker)
        except (ValueError, ProcessLookupError):
            marker.unlink(missing_ok=True)
    return live


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local SLURM, started if needed; SLURM_CONF is exported for the session.

    Several test sessions may share the cluster: each leaves a marker under <state>/sessions, and the last one
    out stops the cluster, but only if a test session started it (a cluster started by hand is left running).
    """
    reason = _skip_reason()
    if reason and os.environ.get("HPCDISTILL_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPCDISTILL_REQUIRE_SLURM=1 but {reason}", pytrace=False)  # CI must not skip these silently
    if reason:
        print(f"skipping SLURM tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    env = dict(os.environ, PATH=_path_with_sbin())
    state_dir = Path(env.get("HPCDISTILL_SLURM_DIR", "/tmp/hpcdistill-slurm"))
    sessions = state_dir / "sessions"
    started_by_tests = state_dir / "started-by-tests"
    # Registered before starting, so a session finishing meanwhile does not stop the cluster under us.
    sessions.mkdir(parents=True, exist_ok=True)
    marker = sessions / str(os.getpid())
    marker.touch()
    if _cluster("status", env, timeout=60).returncode != 0:
        started_by_tests.touch()
    started = _cluster("start", env)
    if started.returncode != 0:
        marker.unlink(missing_ok=True)
        pytest.fail(f"slurm/cluster.sh start failed:\n{started.stdout}\n{started.stderr}", pytrace=False)
    print(started.stdout.strip(), file=sys.stderr)
    slurm_conf = state_dir / "etc" / "slurm.conf"
    saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    os.environ["SLURM_CONF"] = str(slurm_conf)
    os.environ["PATH"] = env["PATH"]
    try:
        yield SlurmCluster(state_dir=state_dir, slurm_conf=slurm_conf)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        marker.unlink(missing_ok=True)
        if started_by_tests.exists() and not _live_sessions(sessions):
            started_by_tests.unlink(missing_ok=True)
            stopped = _cluster("stop", env)
            print(stopped.stdout.strip(), stopped.stderr.strip(), file=sys.stderr)


# ---- sacct, shared by the SLURM tests (test_slurm_cluster.py, test_launch.py) ----
SLURM_FINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
)


def sacct_runs(job_id: str | int) -> list[tuple[str, str]]:
    """(State, ExitCode) of every run of one job ("12", or an array task "12_0"), oldest first: sacct keeps each
    requeued run as a duplicate record. "CANCELLED by 0" reads CANCELLED."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--duplicates", "-j", str(job_id), "-o", "JobID,State,ExitCode"],
        check=True,
        text=True,
        capture_output=True,
        timeout=30,
    ).stdout
    rows = [line.split("|") for line in out.splitlines() if line.strip()]
    return [(state.split()[0], code) for jid, state, code in rows if jid == str(job_id)]


def sacct_wait_final(job_id: str | int, timeout: float) -> list[tuple[str, str]]:
    """sacct_runs once the job's latest run is in a final state (sacct lags the job's own end a moment); fails the
    test with the job's history and `scontrol show job` on timeout."""
    deadline = time.monotonic() + timeout
    history: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        history = sacct_runs(job_id)
        if history and history[-1][0] in SLURM_FINAL_STATES:
            return history
        time.sleep(0.5)
    show = subprocess.run(["scontrol", "show", "job", str(job_id)], text=True, capture_output=True, timeout=30)
    pytest.fail(
        f"job {job_id} not finished after {timeout:.0f}s; sacct says {history}; scontrol says:\n{show.stdout}",
        pytrace=False,
    )


@pytest.fixture(autouse=True)
def _restore_the_requeue_signal():
    """A debug launch runs its tasks in this process, and a finished task ignores SIGUSR2 as a finished job must:
    restore the handler, so no test sees another's signal state."""
    saved = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, saved)


# Fixtures that live beside their helpers (imported last: those modules import this one).
from launch_helpers import launch_shards  # noqa: E402, F401, I001  (fixtures of the launch tests)
from shard_fixtures import shard_slides, small_disk  # noqa: E402, F401, I001  (fixtures of the shard tests)
from slide_fixtures import svs  # noqa: E402, F401, I001  (the Aperio SVS of the slide tests)
