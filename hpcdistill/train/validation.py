"""Validation during training: every val sample once, split across ranks, through the shared model-over-stream loop;
the frozen teacher's outputs kept between epochs; the metrics best.pt is selected on."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from hpcdistill.common.signals import check_interrupted
from hpcdistill.data.streams import make_loader
from hpcdistill.models.inference import model_outputs
from hpcdistill.scoring.metrics import kappa_weights_for
from hpcdistill.train.data_plan import stream_spec
from hpcdistill.train.distributed import any_rank
from hpcdistill.train.nonfinite_stop import stop_on_nonfinite
from hpcdistill.train.state import Trainer, model_input

TEACHER_VAL_CACHE_BYTES = 256 * 2**20


def teacher_val_outputs(trainer: Trainer, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's (features, logits) for a validation sample. Validation images are not augmented, so
    these never change during a run: kept after the first validation (up to TEACHER_VAL_CACHE_BYTES; the rest is
    recomputed) instead of recomputed every epoch, where the teacher's 10x forward is most of validation's cost."""
    state = trainer.state
    key = batch["key"][0]
    if key in state.teacher_val:
        return state.teacher_val[key]
    outputs = trainer.teacher(model_input(trainer, batch["t"]))
    size = sum(t.numel() * t.element_size() for t in outputs)
    if state.teacher_val_bytes + size <= TEACHER_VAL_CACHE_BYTES:
        state.teacher_val[key] = outputs
        state.teacher_val_bytes += size
    return outputs


def val_metrics(rows: list[dict[str, Any]], num_classes: int, kappa_weights: str = "unweighted") -> dict[str, Any]:
    from hpcdistill.scoring.cohort_checks import call_share
    from hpcdistill.scoring.metrics import METRICS, classification_metrics

    out: dict[str, Any] = {"samples": len(rows)}
    labeled = [r for r in rows if r["y"] >= 0]
    if labeled:
        m = classification_metrics([r["y"] for r in labeled], [r["pred"] for r in labeled], num_classes, kappa_weights)
        out.update({k: m[k] for k in METRICS})  # balanced and top-1 accuracy beside the paper's OvR metrics
        out["per_class"] = {k: m["per_class"][k] for k in ("accuracy", "recall", "support")}
        out["confusion"] = m["confusion"]
        out["max_call_share"] = call_share([r["pred"] for r in labeled], num_classes)[1]  # the teacher gate reads it
    if rows and "teacher_pred" in rows[0]:
        out["agreement"] = sum(r["pred"] == r["teacher_pred"] for r in rows) / len(rows)  # collapse shows here
    for name in ("kl", "loss"):  # continuous: they move with every sample, where accuracy moves in 1/n steps
        values = [r[name] for r in rows if name in r]
        if values:
            out[name] = sum(values) / len(values)
    return out


def _val_row(trainer: Trainer, batch: dict[str, Any], s_feat: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """One sample's prediction, label and loss (and the teacher's prediction in distill mode)."""
    cfg = trainer.cfg
    row = {"key": batch["key"][0], "y": int(batch["y"][0]), "pred": int(logits.float().argmax(1)[0])}
    if trainer.teacher is not None:
        from hpcdistill.train.losses import distill_loss

        t_feat, t_logits = teacher_val_outputs(trainer, batch)
        row["teacher_pred"] = int(t_logits.float().argmax(1)[0])
        losses = distill_loss(
            s_feat.float(),
            logits.float(),
            t_feat.float(),
            t_logits.float(),
            cfg.train.temperature,
            tuple(cfg.train.pixel_resize),
        )
        row["loss"], row["kl"] = float(losses["total"]), float(losses["soft"])  # kl: the soft term, KL·T²
    elif row["y"] >= 0:
        row["loss"] = float(F.cross_entropy(logits.float(), batch["y"].to(trainer.device)))
    return row


@torch.no_grad()
def validate(trainer: Trainer) -> dict[str, Any]:
    """The val metrics of the training weights, and with train.ema_decay those of their average as ema_*; one read
    of the val shards scores both."""
    if trainer.plan.val is None:
        return {}
    scored = [("", trainer.engine.module, trainer.dtype)]
    if trainer.ema is not None:
        scored.append(("ema_", trainer.ema.module, torch.float32))
    rows = val_rows(trainer, scored)
    metrics: dict[str, Any] = {}
    for prefix, _, _ in scored:
        kappa = kappa_weights_for(trainer.cfg.data.ordinal_classes)
        m = val_metrics(gather_rows(trainer, rows[prefix]), trainer.cfg.model.num_classes, kappa)
        metrics.update({f"{prefix}{k}": v for k, v in m.items() if not (prefix and k == "samples")})
    return metrics


def val_rows(
    trainer: Trainer, scored: list[tuple[str, torch.nn.Module, torch.dtype]]
) -> dict[str, list[dict[str, Any]]]:
    """Every val sample of this rank once, through each (prefix, module, dtype); stops every rank together if any
    module's outputs are not finite."""
    state = trainer.state
    cfg = trainer.cfg
    spec = stream_spec(cfg, trainer.plan, trainer.rank, trainer.world, epoch=0, start_batch=0, val=True)
    modes = [module.training for _, module, _ in scored]
    for _, module, _ in scored:
        module.eval()
    loader = make_loader(spec, cfg.data.num_workers, pin_memory=trainer.device.type == "cuda")
    remedy = (
        f"reshard with a smaller --max-size (tissues are cut into aligned windows). Last checkpoint: "
        f"{state.last_ckpt or 'none'}"
    )
    rows: dict[str, list[dict[str, Any]]] = {prefix: [] for prefix, _, _ in scored}
    first_bad: dict[str, dict[str, Any]] = {}
    for raw in loader:
        check_interrupted()  # a long validation ends within one tissue on Ctrl-C or SIGTERM
        for prefix, module, dtype in scored:
            for batch, s_feat, logits in model_outputs(
                module, [raw], trainer.device, dtype, mag=cfg.model_mag, remedy=remedy
            ):
                if prefix not in first_bad and not torch.isfinite(logits).all():
                    first_bad[prefix] = batch  # an argmax of NaN logits would be scored as class 0
                rows[prefix].append(_val_row(trainer, batch, s_feat, logits))
    for (_, module, _), mode in zip(scored, modes):
        module.train(mode)
    for prefix, _, _ in scored:  # the same order on every rank: any_rank is a collective
        bad = first_bad.get(prefix)
        if any_rank(bad is not None, trainer.device):
            where = f" on {bad['key'][0]}" if bad is not None else " on another rank"
            whose = "EMA weights: " if prefix else ""
            stop_on_nonfinite(
                trainer,
                [bad] if bad is not None else [],
                f"validation after step {state.global_step} "
                f"(epoch {state.epoch}): {whose}outputs are not finite{where}",
            )
    return rows


def gather_rows(trainer: Trainer, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows on every rank, by sample key."""
    gathered: list[list[dict[str, Any]]] = [rows]
    if trainer.world > 1:
        gathered = [None] * trainer.world  # type: ignore[list-item]
        torch.distributed.all_gather_object(gathered, rows)
    return sorted((r for part in gathered for r in part), key=lambda r: r["key"])
