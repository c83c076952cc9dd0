"""Groups without labels: the group of each training sample inferred from the teacher, never read from the metadata.

``grouping.mode`` (the true groups are then used for evaluation only):

- ``error`` (classification, JTT's error split): ``group = (label, teacher right or wrong)``, ``2 x n_classes``
  groups (those without samples are simply unseen);
- ``kmeans``: k-means (``grouping.k``, k-means++ seeded with ``grouping.seed``) on the teacher's penultimate
  features (the input of its last linear layer, i.e. the pooled deepest features; image statistics when the model
  has no linear layer), averaged over each case (all slices of an M&Ms subject land in one group); for a
  classification task within each class (``n_classes x k`` groups), else over all cases (``k`` groups).

:func:`adjusted_rand_index` and :func:`confusion` measure the agreement with the true groups (written to
``groups_inferred.csv`` and ``metrics.json``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import UserError
from .teacher import in_order

MODES = ("labels", "error", "kmeans")


@torch.no_grad()
def teacher_pass(model: nn.Module, dataset: Any, device: torch.device, batch_size: int,
                 autocast: Any) -> dict[str, Tensor]:
    """Over the training set (:func:`~groupdistil.teacher.in_order`): the teacher's ``cls`` argmax (if any), the
    labels ``cls`` (if any) and ``feat`` ``(N, D)``: the input of the model's last ``nn.Linear`` (else per-image
    statistics)."""
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    captured: list[Tensor] = []
    hook = linear[-1].register_forward_pre_hook(lambda m, inp: captured.append(inp[0].float())) if linear else None
    out: dict[str, list[Tensor]] = {"feat": [], "pred": [], "cls": []}
    model.eval()
    try:
        for b in in_order(dataset, batch_size, device):
            x = b["x"]
            captured.clear()
            with autocast():
                logits = model(x)
            if captured:
                out["feat"].append(captured[-1].flatten(1).cpu())
            else:
                flat = x.float().flatten(1)
                q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=flat.device), dim=1).t()
                out["feat"].append(torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), q], 1).cpu())
            if "cls" in logits:
                out["pred"].append(logits["cls"].argmax(1).cpu())
            if "cls" in b:
                out["cls"].append(b["cls"].cpu())
    finally:
        if hook is not None:
            hook.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ initialisation, seeded; returns the cluster of each row (float64 maths)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    k = min(k, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
    c = np.asarray(centres)
    assign = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        assign_new = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        if _ and np.array_equal(assign_new, assign):
            break
        assign = assign_new
        c = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    return assign


def infer_groups(mode: str, k: int, seed: int, passed: dict[str, Tensor], cases: list[str],
                 class_names: list[str] | None) -> tuple[Tensor, list[str]]:
    """The inferred group of every training sample ``(N,)`` and the group names, from :func:`teacher_pass`."""
    if mode == "error":
        y, wrong = passed["cls"], (passed["pred"] != passed["cls"]).long()
        n_cls = len(class_names) if class_names else int(y.max()) + 1
        names = [f"{class_names[c] if class_names else c}/{'wrong' if w else 'right'}"
                 for c in range(n_cls) for w in (0, 1)]
        return 2 * y + wrong, names
    feat = passed["feat"].double()
    feat = (feat - feat.mean(0)) / feat.std(0).clamp_min(1e-8)  # standardised features
    order = sorted(set(cases))
    case_of = torch.tensor([order.index(c) for c in cases])
    case_feat = torch.zeros(len(order), feat.shape[1], dtype=torch.float64).index_add_(0, case_of, feat)
    case_feat /= torch.bincount(case_of, minlength=len(order)).clamp_min(1).unsqueeze(1)
    if "cls" in passed and class_names:  # classification: k clusters within each class
        y = passed["cls"]
        case_cls = torch.zeros(len(order), dtype=torch.long).index_copy_(0, case_of, y)
        group = torch.zeros(len(order), dtype=torch.long)
        for c in range(len(class_names)):
            sel = (case_cls == c).nonzero().flatten()
            if len(sel):
                group[sel] = c * k + torch.as_tensor(kmeans(case_feat[sel].numpy(), k, seed + c))
        names = [f"{class_names[c]}/cluster{j}" for c in range(len(class_names)) for j in range(k)]
    else:
        group = torch.as_tensor(kmeans(case_feat.numpy(), k, seed))
        names = [f"cluster{j}" for j in range(k)]
    return group[case_of].long(), names


def confusion(true: Tensor, inferred: Tensor, n_true: int, n_inferred: int) -> list[list[int]]:
    """Counts ``[true group][inferred group]``."""
    m = torch.zeros(n_true, n_inferred, dtype=torch.long)
    m.index_put_((true.long(), inferred.long()), torch.ones(len(true), dtype=torch.long), accumulate=True)
    return m.tolist()


def adjusted_rand_index(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labelings (1: identical partitions, ~0: chance)."""
    a, b = np.asarray(a), np.asarray(b)
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.int64)
    np.add.at(table, (ai, bi), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) // 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), math.comb(len(a), 2)
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    return 1.0 if best == expected else (index - expected) / (best - expected)


def agreement(grouping: dict[str, Any], true: Tensor, true_names: list[str], inferred: Tensor, names: list[str],
              cases: list[str]) -> tuple[dict[str, Any], str]:
    """``metrics.json["grouping"]`` (mode, k, the adjusted Rand index with the true groups, the confusion table) and
    the text of ``groups_inferred.csv`` (``index, case, true_group, inferred_group``)."""
    info = {"mode": grouping["mode"], "k": grouping["k"], "groups": names,
            "adjusted_rand_index": adjusted_rand_index(true.numpy(), inferred.numpy()),
            "confusion": {"rows (true)": true_names, "columns (inferred)": names,
                          "counts": confusion(true, inferred, len(true_names), len(names))}}
    rows = ["index,case,true_group,inferred_group"] + [
        f"{i},{cases[i]},{true_names[int(t)]},{names[int(q)]}" for i, (t, q) in enumerate(zip(true.tolist(),
                                                                                             inferred.tolist()))]
    return info, "\n".join(rows) + "\n"


@dataclass(frozen=True)
class InferredGroups:
    """The training groups of a run under ``grouping.mode`` error / kmeans: the group of every training sample
    ``(N,)`` (CPU), their names and counts, ``metrics.json["grouping"]`` and the text of ``groups_inferred.csv``."""

    groups: Tensor
    names: list[str]
    counts: list[int]
    info: dict[str, Any]
    csv_text: str


def infer_training_groups(g: dict[str, Any], model: nn.Module, dataset: Any, pipeline: Any, device: torch.device,
                          batch_size: int, autocast: Any) -> InferredGroups:
    """Groups from the teacher (``g``: the ``grouping`` config section), with their agreement with the true groups
    (which training never uses)."""
    passed = teacher_pass(model, dataset, device, batch_size, autocast)
    if g["mode"] == "error" and "pred" not in passed:
        raise UserError("grouping.mode 'error' needs a classification head (cls) on the teacher")
    classes = pipeline.class_names() if "cls" in passed and "seg" not in pipeline.heads else None
    inferred, names = infer_groups(g["mode"], g["k"], g["seed"], passed, pipeline.train_cases(), classes)
    info, csv_text = agreement(g, pipeline.train_groups(), list(pipeline.group_names), inferred, names,
                               pipeline.train_cases())
    return InferredGroups(inferred, names, torch.bincount(inferred, minlength=len(names)).tolist(), info, csv_text)
