"""Distillation losses (paper §3.3, eqs. 1-3): soft (KL with temperature) and pixel-wise feature-map MSE.

Both compute in float32 whatever the input dtype, so bf16 activations do not lose the small
probabilities the temperature is there to expose.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from hpcdistill.common.errors import TrainError
from hpcdistill.config.schema import RESIZES


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, summed over classes and averaged over the batch (eq. 2).

    The T^2 factor keeps gradient magnitudes independent of T (Hinton et al.). Computed from log_softmax
    in float32, so it is finite for any finite logits. The teacher side is not detached: run the teacher
    under `no_grad`.
    """
    if not temperature > 0:
        raise TrainError(f"temperature: must be positive, got {temperature!r}")
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise TrainError(
            f"soft_loss: logits must both be (batch, classes), got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2


def _resize_names(resize: str | Iterable[str]) -> tuple[str, ...]:
    names = (resize,) if isinstance(resize, str) else tuple(resize)
    for name in names:
        if name not in RESIZES:
            raise TrainError(f"resize: unknown resize function {name!r}; choose from {', '.join(RESIZES)}")
    if len(set(names)) != len(names):
        raise TrainError(f"resize: {list(names)} names a function twice")
    return names


def resize_to(teacher_features: torch.Tensor, size: tuple[int, int], name: str) -> torch.Tensor:
    """g(F_t): the teacher map resized to the student's (h, w) by adaptive max-pool or bicubic interpolation."""
    if name == "maxpool":
        return F.adaptive_max_pool2d(teacher_features, size)
    return F.interpolate(teacher_features, size=size, mode="bicubic", align_corners=False)


def pixel_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, resize: str | Iterable[str] = RESIZES
) -> torch.Tensor:
    """Mean over the chosen g of MSE(g(F_t), F_s) (eq. 3; MSE is the mean over all elements).

    `resize` is any subset of ("maxpool", "bicubic"), giving the paper's ablation KD / KD+MP / KD+INT /
    KD+MP+INT. The empty subset returns a zero that is still attached to the student's graph (backward
    gives zero gradients), so callers need no special case.

    Difference from the authors' public code: its combined mode selects the max-pool branch with an
    `if ... elif`, so only the max-pool term is ever computed. We compute both terms and average them,
    as eq. 3 and the supplementary ablation describe.
    """
    names = _resize_names(resize)
    if student_features.ndim != 4 or teacher_features.ndim != 4:
        raise TrainError(
            f"pixel_loss: feature maps must be (N, C, h, w), got student "
            f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)}"
        )
    if student_features.shape[:2] != teacher_features.shape[:2]:
        raise TrainError(
            f"pixel_loss: student and teacher maps need the same batch and channel counts, got student "
            f"{tuple(student_features.shape)} and teacher {tuple(teacher_features.shape)} "
            f"(use the same architecture and width for both)"
        )
    student = student_features.float()
    if not names:
        return student.sum() * 0.0
    teacher = teacher_features.float()
    size = (student.shape[2], student.shape[3])
    terms = [F.mse_loss(resize_to(teacher, size, name), student) for name in names]
    return torch.stack(terms).mean()


def distill_loss(
    s_feat: torch.Tensor,
    s_logits: torch.Tensor,
    t_feat: torch.Tensor,
    t_logits: torch.Tensor,
    temperature: float,
    resize: str | Iterable[str] = RESIZES,
) -> dict[str, torch.Tensor]:
    """Eq. 1: {"total": soft + pixel, "soft": ..., "pixel": ...} (all float32 scalars)."""
    soft = soft_loss(s_logits, t_logits, temperature)
    pixel = pixel_loss(s_feat, t_feat, resize)
    return {"total": soft + pixel, "soft": soft, "pixel": pixel}
