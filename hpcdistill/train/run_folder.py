"""The run folder, `<run.out_dir>/<run.name>/`, and everything in it:

    checkpoints/step000000012/            a DeepSpeed checkpoint; resumable only once its COMPLETE marker exists.
                                          The resolved config is stored inside it (client state), not only beside it.
    checkpoints/step000000013.diverged/   set aside after a non-finite loss (or `.superseded`, after a resume from
                                          an older checkpoint): never resumed from
    best.pt, last.pt                      exported weights (format and reader: models.export)
    config.yaml                           the resolved config the run uses (never values it ignores)
    provenance.json                       how this start was made: versions, commit, host, command, SLURM ids
    progress.json                         epoch, step and ETA, for `hpcdistill status` and a local launch
    metrics.jsonl                         every logged scalar, a line per log step and per validation (metrics_log)
    tb/                                   TensorBoard's event files

What goes into a checkpoint or an export is checkpointing.py's; which config changes a resume accepts, resume.py's.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from hpcdistill.common.errors import RunFolderError, one_line
from hpcdistill.common.files import atomic_output, atomic_write_json, atomic_write_text
from hpcdistill.common.limits import regular_file
from hpcdistill.common.output_folder import check_links, input_at
from hpcdistill.common.progress import write_progress
from hpcdistill.common.provenance import PROVENANCE, provenance
from hpcdistill.config.schema import resolve_path
from hpcdistill.models.export import export_blob
from hpcdistill.train.distributed import barrier

COMPLETE = "COMPLETE"  # written after every rank finished a save: a checkpoint without it is never loaded
# What a run (and `evaluate`'s default --out) writes in its folder: what `run.resume: overwrite` removes first. An
# evaluation of the old weights beside new ones would describe a model that is no longer there.
RUN_OUTPUTS = (
    "checkpoints",
    "best.pt",
    "last.pt",
    "last-ema.pt",
    "best-*.pt",  # train.export_also's picks
    "config.yaml",
    PROVENANCE,
    "progress.json",
    "metrics.jsonl",
    "tb",
    "ranks",
    "eval",
)
MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed (ZeRO 0): module weights + client state, from rank 0


def checkpoint_tag(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint dirs with a completion marker, oldest first (a save killed midway has none)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if (p / COMPLETE).is_file())


def _is_write_failure(err: RuntimeError) -> bool:
    """torch's serializer reports a failed write (no space, I/O) as a RuntimeError from its zip writer."""
    text = str(err)
    return any(m in text for m in ("PytorchStreamWriter", "unexpected pos", "file write failed", "No space left"))


def _refused(what: str, checkpoint: Path, err: pickle.UnpicklingError) -> RunFolderError:
    """What weights_only=True refuses: a pickled object, not plain weights."""
    reason = one_line(err, 200)
    return RunFolderError(f"{what}: {checkpoint}: refused, it holds more than plain weights ({reason})")


def _load_weights_only(path: Path, what: str) -> dict[str, Any]:
    regular_file(path, lambda reason: RunFolderError(f"{what}: {reason}"))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise _refused(what, path.parent, err) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise RunFolderError(f"{what}: {path}: unreadable ({one_line(err, 200)})") from None


def use_weights_only_loads(engine: Any) -> None:
    """DeepSpeed's torch checkpoint engine unpickles any object it finds; ours loads with weights_only=True,
    which a ZeRO-0 checkpoint (tensors, numbers, strings, dicts) passes."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RunFolderError(
            f"deepspeed: checkpoint engine {type(engine.checkpoint_engine).__name__} is not "
            "supported (only torch.save checkpoints, loaded with weights_only=True); remove the "
            "checkpoint writer settings from the DeepSpeed config"
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


class RunFolder:
    """Checkpoints, exports and the resolved config of one run; rank 0 writes what only one rank must write."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.rank = rank

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints_dir)

    def write_config(self, config: dict[str, Any]) -> None:
        """config.yaml beside the checkpoints, written whole or not at all."""
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def write_progress(self, progress: dict[str, Any]) -> None:
        """progress.json (format and reader in hpcdistill.common.progress, which the launcher imports without torch)."""
        if self.rank == 0:
            write_progress(self.path, progress)

    # ------------------------------------------------------------------------------------------- checkpoints
    def write_checkpoint(
        self, engine: Any, step: int, client: dict[str, Any], config: dict[str, Any], keep_last: int
    ) -> Path:
        """A collective save of the DeepSpeed state with `client` and the config inside; COMPLETE once every rank
        is done; then all but the newest `keep_last` complete checkpoints are pruned."""
        target = self.checkpoints_dir / checkpoint_tag(step)
        if self.rank == 0 and target.exists():  # from a discarded trajectory: its marker must not bless new files
            shutil.rmtree(target)
        barrier()
        try:
            engine.save_checkpoint(
                str(self.checkpoints_dir), tag=target.name, client_state={**client, "config": config}, save_latest=False
            )
            barrier()
            if self.rank == 0:
                atomic_write_json(target / COMPLETE, {"global_step": step})
        except (OSError, RuntimeError) as err:  # a full disk or quota; torch's zip writer says it as RuntimeError
            if isinstance(err, RuntimeError) and not _is_write_failure(err):
                raise
            shutil.rmtree(target, ignore_errors=True)  # the half-written folder has no marker: never resumed
            intact = [p for p in self.complete_checkpoints() if p != target]
            reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err, 160)
            raise RunFolderError(
                f"{target}: checkpoint not saved ({reason}); the last complete one, "
                f"{intact[-1] if intact else 'none'}, is intact: free space and rerun to resume"
            ) from None
        if self.rank == 0:
            for old in self.complete_checkpoints()[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return target

    def earlier_outputs(self) -> list[str]:
        """The names of what earlier runs wrote here (RUN_OUTPUTS), sorted."""
        return sorted({p.name for pattern in RUN_OUTPUTS for p in self.path.glob(pattern)})

    def clear(self, inputs: list[str]) -> list[str]:
        """`run.resume: overwrite`: remove what earlier runs wrote here (RUN_OUTPUTS, never through a link that leaves
        the folder), refused in one line where one of them holds an input of this run (`inputs`: its teacher or
        initial weights). Returns the names removed."""
        present = self.earlier_outputs()
        check_links(self.path, present)
        for name in present:
            source = input_at(self.path / name, [i for i in inputs if i])
            if source is not None:
                raise RunFolderError(
                    f"{source}: an input of this run, in {self.path / name} which --overwrite (run.resume: overwrite) "
                    "would remove; move it out of the run folder first"
                )
        for name in present:
            entry = self.path / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return present

    def resume_target(self, how: str) -> Path | None:
        """The checkpoint `run.resume` asks for: the newest complete one ("auto"), none ("never", and "overwrite"
        once `clear` has run), or a path."""
        found = self.complete_checkpoints()
        if how in ("never", "overwrite"):
            if found:
                raise RunFolderError(
                    f"run.resume: never, but {self.checkpoints_dir} already holds checkpoints; "
                    "use run.resume=auto or another run.name"
                )
            return None
        if how == "auto":
            return found[-1] if found else None
        target = resolve_path(how)
        if not (target / COMPLETE).is_file():
            raise RunFolderError(f"run.resume: {target} is not a complete checkpoint (no {COMPLETE} marker)")
        return target

    def stored_config(self, target: Path) -> tuple[dict[str, Any] | None, str | None]:
        """The resolved config saved inside the checkpoint (checkpoints of older versions fall back to config.yaml)
        and the sha256 of the manifest the run trained on (None if not recorded)."""
        blob = _load_weights_only(target / MODEL_STATES, "run.resume")
        if isinstance(blob.get("config"), dict):
            return blob["config"], blob.get("manifest_sha256")
        beside = self.path / "config.yaml"
        return (yaml.safe_load(beside.read_text()) if beside.is_file() else None), None

    def load_checkpoint(self, engine: Any, target: Path) -> dict[str, Any]:
        """Weights, optimizer state and the client state (the loop's position) from a complete checkpoint."""
        try:
            path, client = engine.load_checkpoint(str(target.parent), tag=target.name)
        except pickle.UnpicklingError as err:
            raise _refused("run.resume", target, err) from None
        if path is None or client is None:
            raise RunFolderError(f"run.resume: could not load {target}")
        return client

    def load_module_weights(self, module: torch.nn.Module, target: Path) -> None:
        """Only the model weights of a checkpoint (to test them), without touching optimizer or position."""
        module.load_state_dict(_load_weights_only(target / MODEL_STATES, "checkpoint")["module"])

    def set_aside(self, checkpoints: list[Path], reason: str, suffix: str = ".diverged") -> list[Path]:
        """Rename checkpoints to `<tag><suffix>` with a note saying why: kept for inspection, never resumed."""
        moved = [p.with_name(p.name + suffix) for p in checkpoints]
        if self.rank == 0:
            for old, new in zip(checkpoints, moved):
                shutil.rmtree(new, ignore_errors=True)
                (old / COMPLETE).unlink(missing_ok=True)  # first: a crash midway leaves nothing resumable behind
                (old / suffix.lstrip(".").upper()).write_text(reason + "\n")  # e.g. DIVERGED: why it was set aside
                old.rename(new)
        barrier()
        return moved

    # ------------------------------------------------------------------------------------------- exports
    def write_provenance(self) -> None:
        """provenance.json: how this start of the run was made (each restart after a requeue rewrites it; every
        checkpoint and export keeps the record of the process that wrote it)."""
        if self.rank == 0:
            atomic_write_json(self.path / PROVENANCE, provenance(), indent=1)

    def write_export(self, name: str, module: torch.nn.Module, **fields: Any) -> Path:
        """The export (models.export's format: `export_blob`'s `fields`), written atomically by rank 0."""
        path = self.path / name
        if self.rank != 0:
            return path
        blob = export_blob(module, **fields)
        try:
            with atomic_output(path) as tmp:
                torch.save(blob, tmp)
        except OSError as err:
            intact = self.complete_checkpoints()
            raise RunFolderError(
                f"{path}: weights not exported ({err.strerror or err}); the last complete "
                f"checkpoint, {intact[-1] if intact else 'none'}, is intact: free space and rerun "
                "to resume"
            ) from None
        return path

    def export_step(self, name: str) -> int | None:
        """The optimizer step an export was written at (None: absent, or written by an older version)."""
        path = self.path / name
        if not path.is_file():
            return None
        step = _load_weights_only(path, name).get("global_step")
        return int(step) if step is not None else None
