"""Per-sample losses: every function returns one value per sample, shape ``(B,)``; nothing is averaged over the
batch, so the group weighting can form per-group means.

- :func:`kd_term`: ``tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``, softmax over dim 1, averaged over
  any spatial positions (per-pixel KD for segmentation maps).
- :func:`per_sample_ce`: cross-entropy, averaged over any spatial positions.
- :class:`SoftDice`: soft Dice loss of MONAI ``DiceLoss(reduction="none")`` averaged over the foreground
  classes.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _mean_over_positions(t: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over everything but the batch dimension."""
    return t.flatten(1).mean(1) if t.dim() > 1 else t


def kd_term(student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """Hinton's distillation term per sample.

    Args:
        student_logits, teacher_logits: ``(B, K)`` or ``(B, K, *spatial)``.
        tau: temperature (> 0).
    Returns:
        ``(B,)``: ``tau^2 * sum_k p_T,k (log p_T,k - log p_S,k)`` with ``p = softmax(z / tau, dim=1)``, averaged
        over the spatial positions. Zero when the logits are equal. Computed in float32 at least.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_ps = F.log_softmax(student_logits.to(dtype) / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits.to(dtype) / tau, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return (tau * tau) * _mean_over_positions(kl)


def per_sample_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per sample: ``logits (B, K[, *S])``, ``target`` long ``(B[, 1], *S)`` -> ``(B,)``."""
    if target.dim() == logits.dim():  # (B, 1, H, W) label maps
        target = target.squeeze(1)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return _mean_over_positions(F.cross_entropy(logits.to(dtype), target.long(), reduction="none"))


class SoftDice:
    """Per-sample soft Dice loss over the foreground classes (MONAI ``DiceLoss(reduction="none")``)."""

    def __init__(self) -> None:
        from monai.losses import DiceLoss  # imported here: the engine needs MONAI only for segmentation heads

        self._dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        """``logits (B, K, H, W)``, ``target`` long ``(B, 1, H, W)`` -> ``(B,)``."""
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return self._dice(logits.to(dtype), target).flatten(1).mean(1)


class ClassificationLoss:
    """``alpha * CE + (1 - alpha) * KD`` per sample; ``CE`` alone without a teacher."""

    def __init__(self, alpha: float = 0.5, tau: float = 4.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"loss.tau must be > 0, got {tau}")
        self.alpha, self.tau = alpha, tau

    def __call__(self, logits: Tensor, target: Tensor, teacher_logits: Tensor | None) -> dict[str, Tensor]:
        ce = per_sample_ce(logits, target)
        if teacher_logits is None:
            return {"ce": ce, "total": ce, "label": ce}
        kd = kd_term(logits, teacher_logits, self.tau)
        return {"ce": ce, "kd": kd, "total": self.alpha * ce + (1.0 - self.alpha) * kd, "label": ce}


class SegmentationLoss:
    """``lambda_dice * Dice + lambda_ce * CE + lambda_kd * KD`` per sample (the KD term only with a teacher)."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, lambda_kd: float = 1.0,
                 tau: float = 4.0) -> None:
        for name, v in (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce), ("lambda_kd", lambda_kd)):
            if v < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {v}")
        if tau <= 0:
            raise ValueError(f"loss.tau must be > 0, got {tau}")
        self.lambda_dice, self.lambda_ce, self.lambda_kd, self.tau = lambda_dice, lambda_ce, lambda_kd, tau
        self.dice = SoftDice()

    def __call__(self, logits: Tensor, target: Tensor, teacher_logits: Tensor | None) -> dict[str, Tensor]:
        dice = self.dice(logits, target)
        ce = per_sample_ce(logits, target)
        out = {"dice": dice, "ce": ce, "total": self.lambda_dice * dice + self.lambda_ce * ce}
        out["label"] = out["total"]
        if teacher_logits is not None:
            out["kd"] = kd_term(logits, teacher_logits, self.tau)
            out["total"] = out["total"] + self.lambda_kd * out["kd"]
        return out


HEAD_LOSSES = {"cls": ClassificationLoss, "seg": SegmentationLoss}


class TaskLoss:
    """Per-sample loss of a model with one or more heads: ``sum_h w_h * loss_h``.

    ``outputs`` and ``teacher_outputs`` map head names to logits; the target of head ``h`` is ``batch[h]``.
    Returns ``{"total": (B,), "label": (B,), "<head>/<term>": (B,), ...}``; ``label`` is the loss without the KD
    term (what the model would be trained on without a teacher), the same function for a student and a teacher.
    """

    def __init__(self, heads: dict[str, float], cfg: dict[str, Any]) -> None:
        unknown = sorted(set(heads) - set(HEAD_LOSSES))
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; valid: {sorted(HEAD_LOSSES)}")
        self.weights = dict(heads)
        self.losses = {
            "cls": ClassificationLoss(alpha=cfg["alpha"], tau=cfg["tau"]),
            "seg": SegmentationLoss(cfg["lambda_dice"], cfg["lambda_ce"], cfg["lambda_kd"], tau=cfg["tau"]),
        }

    def __call__(self, outputs: dict[str, Tensor], batch: dict[str, Tensor],
                 teacher_outputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        total: Tensor | None = None
        label: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for head, weight in self.weights.items():
            t_logits = None if teacher_outputs is None else teacher_outputs[head]
            parts = self.losses[head](outputs[head], batch[head], t_logits)
            for k, v in parts.items():
                if k not in ("total", "label"):
                    terms[f"{head}/{k}"] = v
            total = weight * parts["total"] if total is None else total + weight * parts["total"]
            label = weight * parts["label"] if label is None else label + weight * parts["label"]
        assert total is not None and label is not None, "TaskLoss needs at least one head"
        return {"total": total, "label": label, **terms}
