"""What a training run reads: the shard sets its config names (each checked to hold samples), the colour statistics
of the magnifications it uses, how many samples each rank runs per epoch, and the stream spec of each epoch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpcdistill.common.errors import TrainError
from hpcdistill.common.mags import mag_name
from hpcdistill.config.schema import Config, resolve_path
from hpcdistill.data.streams import StreamSpec, per_rank_samples
from hpcdistill.shards.manifest import mag_stats, manifest_digest, read_manifest, split_summary
from hpcdistill.shards.reader import ShardSet, resolve_sets
from hpcdistill.train.budget import budget_line, epoch_samples


@dataclass
class DataPlan:
    manifest: dict[str, Any]
    train: ShardSet
    val: ShardSet | None
    classes: list[str]
    stats: dict[str, dict[str, list[float]]]
    per_rank: int  # samples per rank per epoch
    steps_per_epoch: int  # optimizer steps
    manifest_sha256: str | None = None
    epoch_rule: str = ""  # how the epoch's size was derived, e.g. "1 pass(es) over the 60 labelled train tissues ..."
    budget: str = ""  # the run's budget line (train.budget.budget_line), said before it starts


def plan_data(cfg: Config, world: int) -> DataPlan:
    d, t = cfg.data, cfg.train
    shards = resolve_path(d.shards)
    manifest = read_manifest(shards)

    def nonempty(key: str, entries: list[str]) -> list[ShardSet]:
        """Each entry resolved once; an empty one would silently turn KD (ADv1) into plain KD, or skip validation."""
        sets = [resolve_sets(shards, manifest, [entry]) for entry in entries]
        for entry, found in zip(entries, sets):
            if found.samples == 0:
                raise TrainError(
                    f"{key}: the set {entry!r} in {shards} holds no samples (splits: {split_summary(manifest)})"
                )
        return sets

    labelled = nonempty("data.train", d.train)
    train = ShardSet.combine(labelled + (nonempty("data.aux", d.aux) if t.mode == "distill" else []))
    val = ShardSet.combine(nonempty("data.val", d.val)) if d.val else None
    mags = {mag_name(cfg.model_mag)}
    if t.mode == "distill":
        mags.add(mag_name(d.teacher_mag))
    stats = {name: mag_stats(manifest, float(name[:-1])) for name in mags}
    unit = t.micro_batch * t.grad_accum
    samples, derivation = epoch_samples(cfg, sum(s.samples for s in labelled), train.samples)
    per_rank = per_rank_samples(samples, world, unit)
    return DataPlan(
        manifest,
        train,
        val,
        list(manifest.get("classes", [])),
        stats,
        per_rank,
        per_rank // unit,
        manifest_digest(shards),
        derivation,
        budget_line(cfg, per_rank // unit, per_rank, world, derivation),
    )


def stream_spec(
    cfg: Config, plan: DataPlan, rank: int, world: int, *, epoch: int, start_batch: int, val: bool
) -> StreamSpec:
    d, t = cfg.data, cfg.train
    mode = "paired" if t.mode == "distill" else "labeled"
    return StreamSpec(
        urls=(plan.val if val else plan.train).urls,
        mode=mode,
        mag=cfg.model_mag,
        teacher_mag=d.teacher_mag,
        stats=plan.stats,
        micro_batch=1 if val else t.micro_batch,
        samples=-1 if val else plan.per_rank,
        rank=rank,
        world=world,
        seed=cfg.run.seed,
        epoch=epoch,
        sampler="ordered" if val else d.sampler,
        augment=None if val else d.augment,
        shuffle_buffer=d.shuffle_buffer,
        bucketed=t.bucketed and not val,
        bucket_window=t.bucket_window,
        start_batch=start_batch,
        finish_on_device=True,
        decode_on_device=d.decode == "gpu",  # the loader only decodes, or only reads
    )
