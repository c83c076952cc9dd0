"""Waterbirds accuracies: per group, worst group and the three "average" accuracies that circulate.

With ``acc_g`` the accuracy on the images of group ``g`` of the evaluated split:

- ``worst_group_acc`` = min_g acc_g (the headline number; model selection uses it on val);
- ``avg_acc`` = raw accuracy over all images of the split (val/test are group-balanced within each class);
- ``train_weighted_avg_acc`` = sum_g (n_train_g / n_train) acc_g, the group DRO paper's "average accuracy";
- ``mean_group_acc`` = mean_g acc_g, the unweighted mean some benchmarks call "adjusted accuracy".

Groups with no image in the split have accuracy ``None`` and are left out of the minimum and the means.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from groupdistil.stats import group_mean

ACCURACY_DEFINITIONS = {
    "worst_group_acc": "the lowest per-group accuracy (model selection maximises it on val)",
    "avg_acc": "raw accuracy over every image of the split (val/test are group-balanced within each class)",
    "train_weighted_avg_acc": "per-group accuracies weighted by the training group proportions "
                              "(the group DRO paper's 'average accuracy')",
    "mean_group_acc": "unweighted mean of the per-group accuracies ('adjusted accuracy')",
}


def group_accuracy(correct: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group accuracy (NaN for an empty group) and count, both ``(n_groups,)``, from bool ``correct`` ``(N,)``."""
    return group_mean(correct, group, n_groups)


CLASS_NAMES = ("landbird", "waterbird")  # y = 0, 1


def accuracy_summary(pred: np.ndarray, y: np.ndarray, group: np.ndarray, group_names: Sequence[str],
                     train_counts: Sequence[int], class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
    """All accuracies of predictions ``pred`` ``(N,)`` against labels ``y`` ``(N,)`` (indices into ``class_names``);
    JSON-serialisable.

    Also the engine's keys: ``group_metric`` (= group_acc), ``worst_group_metric`` (= worst_group_acc),
    ``average_metric`` (= train_weighted_avg_acc) and ``class_metric`` (the accuracy on the images of each class,
    read from the labels alone: ``train.selection: worst_class`` selects on it without group labels).
    """
    correct = np.asarray(pred) == np.asarray(y)
    acc, n = group_accuracy(correct, group, len(group_names))
    present = n > 0
    weights = np.asarray(train_counts, dtype=np.float64) * present
    worst = int(np.nanargmin(acc)) if present.any() else None
    summary = {
        "group_acc": {name: (float(a) if ok else None) for name, a, ok in zip(group_names, acc, present)},
        "group_n": {name: int(k) for name, k in zip(group_names, n)},
        "worst_group_acc": float(acc[worst]) if worst is not None else None,
        "worst_group": group_names[worst] if worst is not None else None,
        "avg_acc": float(correct.mean()) if correct.size else None,
        "train_weighted_avg_acc": float(np.nansum(acc * weights) / weights.sum()) if weights.sum() > 0 else None,
        "mean_group_acc": float(acc[present].mean()) if present.any() else None,
    }
    cls_acc, cls_n = group_mean(correct, np.asarray(y), len(class_names))
    summary["class_metric"] = {name: float(a) for name, a, k in zip(class_names, cls_acc, cls_n) if k > 0}
    summary["group_metric"] = summary["group_acc"]
    summary["worst_group_metric"] = summary["worst_group_acc"]
    summary["average_metric"] = summary["train_weighted_avg_acc"]
    return summary
