"""Resuming a run: which config keys may change (RESUMABLE, applied for real: a new lr is the optimizer's lr from the
next step on) and the one-line refusal of any other change, a changed number of ranks or epoch size, and restoring
weights, optimizer, position, weight average and RNG from a checkpoint."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from hpcdistill.common.console import say
from hpcdistill.common.errors import RunFolderError, TrainError
from hpcdistill.common.typed_tree import dotted_leaves
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.shards.manifest import manifest_digest
from hpcdistill.train.budget import SCHEDULE_KEYS, scheduled, stop_reason
from hpcdistill.train.run_folder import RunFolder
from hpcdistill.train.selection import restore_selections
from hpcdistill.train.state import Trainer

# Keys a resumed run may change. Each is applied for real: lr and weight decay go into the optimizer's param groups
# after its state is loaded; the loop reads the others from the config at every use; run.out_dir/run.name only say
# where the (moved) run folder is. A key ending in "." is a prefix.
RESUMABLE = (
    "train.epochs",
    "train.max_steps",
    "train.patience",  # the stop rule, read at every validation; the schedule's shape cannot change (budget.py)
    "train.max_epochs",
    "train.lr",
    "train.weight_decay",
    "train.checkpoint_every_steps",
    "train.channels_last",
    "train.compile",
    "data.decode",  # speed only: the same computation elsewhere
    "train.checkpoint_every_min",
    "train.keep_last",
    "data.num_workers",
    "teacher.min_val_accuracy",  # the gate: judged again at every start, it shapes no step
    "teacher.reference",
    "teacher.gate",
    "run.resume",
    "run.out_dir",
    "run.name",
    "log.",
)


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def config_changes(
    stored: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, new value) for every key whose value differs, in key order. A key the stored
    config lacks (written before the key existed) reads as its value in `defaults`: the behaviour it had then."""
    old, now = {**dotted_leaves(defaults or {}), **dotted_leaves(stored)}, dotted_leaves(new)
    return [(k, old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]


def check_resume_config(
    stored: dict[str, Any],
    new: dict[str, Any],
    checkpoint: Path,
    run_name: str,
    same_shards: bool = False,
    defaults: dict[str, Any] | None = None,
) -> list[str]:
    """The allowed changes as 'key: old -> new'; any other change stops the resume in one line naming each key.
    `same_shards`: the shard folder's manifest is byte-identical to the one the run started on, so a moved
    `data.shards` (e.g. copied to node-local scratch) is the same data."""
    changes = config_changes(stored, new, defaults)
    refused = [
        f"{k}: {a} -> {b}" for k, a, b in changes if not resumable(k) and not (same_shards and k == "data.shards")
    ]
    if refused:
        raise RunFolderError(
            f"{checkpoint}: cannot resume with a changed {', '.join(refused)} (only "
            f"{', '.join(k.rstrip('.') for k in RESUMABLE)} may change on resume); to train with the new values "
            f"start a new run, e.g. run.name={run_name}-2 (run.resume=never guards a new run against resuming)"
        )
    return [f"{k}: {a} -> {b}" for k, a, b in changes if k != "run.resume"]


def apply_resumable(engine: Any, train: Any, scheduled: bool) -> None:
    """Loading a checkpoint restores the optimizer's param groups, lr included: set the config's values again. Under
    a schedule the loaded lr is already the schedule's next one (and train.lr cannot change): it stays."""
    for group in engine.optimizer.param_groups:
        if not scheduled:
            group["lr"] = train.lr
        group["weight_decay"] = train.weight_decay


def resume_changes(cfg: Config, folder: RunFolder, target: Path | None) -> list[str]:
    """The resumable settings this run changes against the checkpoint it resumes; any other change is refused."""
    stored, manifest_sha256 = folder.stored_config(target) if target is not None else (None, None)
    if target is None or stored is None:
        return []
    now = manifest_digest(resolve_path(cfg.data.shards))
    if manifest_sha256 is not None and manifest_sha256 != now:
        raise TrainError(
            f"data.shards: {cfg.data.shards} is not the data {target} was trained on (manifest sha256 "
            f"{manifest_sha256[:12]}, now {(now or 'none')[:12]}): the shards were re-made or replaced; start a new "
            f"run, e.g. run.name={cfg.run.name}-2"
        )
    changes = check_resume_config(
        stored, cfg.to_dict(), target, cfg.run.name, manifest_sha256 is not None, defaults=Config().to_dict()
    )
    bent = [c for c in changes if c.split(":")[0] in SCHEDULE_KEYS and scheduled(cfg)]
    if bent:
        raise TrainError(
            f"{target}: cannot resume with a changed {', '.join(bent)} under an lr schedule (train.schedule, "
            f"train.warmup_fraction): it would bend the schedule the run is on; start a new run, e.g. "
            f"run.name={cfg.run.name}-2"
        )
    return changes


def resume(trainer: Trainer, target: Path, changes: list[str]) -> None:
    """Restore weights, optimizer, position in the data and RNG from `target`; then apply the config's resumable
    settings (lr, weight decay) over the optimizer state's, and say where the run goes on from."""
    client = trainer.folder.load_checkpoint(trainer.engine, target)
    changes = changes + _world_change(trainer, target, client.get("world"), client["batch"])  # before anything moves
    changes += _epoch_size_change(trainer, target, client.get("per_rank"), client.get("world"), client["batch"])
    apply_resumable(trainer.engine, trainer.cfg.train, scheduled=trainer.engine.lr_scheduler is not None)
    newer = [p for p in trainer.folder.complete_checkpoints() if p.name > target.name]
    if newer:  # run.resume named an older checkpoint: a later requeue must not jump back to the abandoned future
        trainer.folder.set_aside(newer, f"superseded: the run was resumed from {target}", ".superseded")
    trainer.state.restore(client)
    if trainer.ema is not None:
        trainer.ema.load_state_dict(client["ema"])  # present: ema_decay cannot change on resume
    torch.set_rng_state(client["torch_rng"])
    random.setstate(client["python_rng"])
    trainer.state.last_ckpt = str(target)
    note = f"; changed on resume: {', '.join(changes)}" if changes else ""
    state = trainer.state
    note += "".join(f"; {stale}" for stale in restore_selections(state.selections, client, trainer.folder.export_step))
    best = state.selections[0]
    if state.batch == 0 and state.epoch > 0:  # recomputed, not stored: a resumable change of the budget counts
        state.stop_reason = stop_reason(trainer.cfg, state.epoch, state.stale, best.value, best.step) or ""
    say(
        f"resuming from {target} (step {state.global_step}, epoch {state.epoch}, micro-batch {state.batch} of the "
        f"epoch){note}"
    )


def _epoch_size_change(trainer: Trainer, target: Path, saved: int | None, world: int | None, batch: int) -> list[str]:
    """The same ranks but another epoch size (the data or the rule that sizes epochs changed): refused mid-epoch,
    said at an epoch's end."""
    now = trainer.plan.per_rank
    if saved is None or saved == now or world != trainer.world:
        return []
    if batch:
        raise TrainError(
            f"{target}: saved mid-epoch with {saved} samples per rank per epoch, this run makes {now} "
            f"({trainer.plan.epoch_rule}): resume as it was, change at an epoch's end"
        )
    return [f"samples per rank per epoch {saved} -> {now}"]


def _world_change(trainer: Trainer, target: Path, saved: int | None, batch: int) -> list[str]:
    """Another number of ranks: refused mid-epoch (each rank's position in its share of the epoch would skip or
    repeat samples), said at an epoch boundary (the global batch changes)."""
    if saved is None or saved == trainer.world:
        return []
    if scheduled(trainer.cfg):
        raise TrainError(
            f"{target}: saved by {saved} rank(s); with {trainer.world} an epoch has another number of steps and the "
            f"lr schedule would no longer end with the run: resume with {saved} rank(s)"
        )
    if batch:
        raise TrainError(
            f"{target}: saved by {saved} rank(s) mid-epoch (micro-batch {batch}); resuming with {trainer.world} "
            f"would skip or repeat samples of the epoch: resume with {saved} rank(s) and change at an epoch's end"
        )
    per_rank = trainer.cfg.train.micro_batch * trainer.cfg.train.grad_accum
    return [
        f"ranks {saved} -> {trainer.world}: the global batch changes from {saved * per_rank} to "
        f"{trainer.world * per_rank}"
    ]
