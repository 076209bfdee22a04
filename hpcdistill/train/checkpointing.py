"""What a checkpoint and an export hold, taken from a trainer: the loop's `State`, RNG, the data's identity and
the ranks in every checkpoint; the weights (or their average), classes, stats, windowing and the validation they
were picked on in every export. The run folder (run_folder.py) writes both to disk."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from hpcdistill.common.mags import mag_name
from hpcdistill.common.provenance import provenance
from hpcdistill.shards.manifest import shard_mag_scale, shard_source, shard_stain
from hpcdistill.slides.windows import DEFAULT_WINDOWING
from hpcdistill.train.selection import Selection, uses_ema
from hpcdistill.train.state import Trainer, scalars


def save_checkpoint(trainer: Trainer) -> str:
    """A collective checkpoint of the engine with the client state a resume needs; returns its path."""
    client = {
        **trainer.state.checkpoint_fields(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "manifest_sha256": trainer.plan.manifest_sha256,  # the data's identity, whatever path it is read from
        "world": trainer.world,  # a mid-epoch position is per rank: another world size would skip or repeat samples
        "per_rank": trainer.plan.per_rank,  # the epoch's size: a resume mid-epoch must cut the epoch the same way
        "provenance": provenance(),
    }
    if trainer.ema is not None:
        client["ema"] = trainer.ema.state_dict()
    path = trainer.folder.write_checkpoint(
        trainer.engine, trainer.state.global_step, client, trainer.cfg.to_dict(), trainer.cfg.train.keep_last
    )
    trainer.state.last_ckpt = str(path)
    trainer.state.last_save_time = time.monotonic()
    # TensorBoard is on disk up to the checkpoint: a hard kill (preemption) loses only the rerun part
    trainer.writer.flush()
    return trainer.state.last_ckpt


def export_weights(trainer: Trainer, name: str, ema: bool = False, val: dict[str, float] | None = None) -> None:
    """The training weights (or with `ema`, their moving average) as a plain export in the run folder, with the
    validation metrics it was picked on (default: the last validation's)."""
    mag = trainer.cfg.model_mag
    module = trainer.ema.module if ema and trainer.ema is not None else trainer.engine.module
    trainer.folder.write_export(
        name,
        module,
        mag=mag,
        classes=trainer.plan.classes,
        stats=trainer.plan.stats[mag_name(mag)],
        config=trainer.cfg.to_dict(),
        global_step=trainer.state.global_step,
        windowing=training_windowing(trainer.plan.manifest),
        source=shard_source(trainer.plan.manifest),
        mag_scale=shard_mag_scale(trainer.plan.manifest).to_dict(),
        stain_norm=shard_stain(trainer.plan.manifest).to_dict(),
        val=scalars(trainer.state.last_val) if val is None else val,
        seen=seen_units(trainer.plan.manifest),
        provenance=provenance(),
    )


def seen_units(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The slides and patients of the training shards outside their test split: every slide a run of these shards
    may have trained, validated or distilled on (a conservative count: a split the run did not read is in it)."""
    slides = {s: v for s, v in (manifest.get("slides") or {}).items() if v.get("status", "ok") == "ok"}
    kept = [s for s, v in slides.items() if v.get("split") != "test"]
    return {"slides": kept, "patients": sorted({str(slides[s].get("patient") or s) for s in kept})}


def training_windowing(manifest: dict[str, Any]) -> dict[str, Any]:
    """How the training shards cut tissues (from their manifest), stored in exports for prediction."""
    params = manifest.get("params") or {}
    return {key: params.get(key, default) for key, default in DEFAULT_WINDOWING.items()}


def export_selection(trainer: Trainer, sel: Selection) -> None:
    export_weights(trainer, sel.file, ema=uses_ema(sel.metric), val=sel.at_pick)
