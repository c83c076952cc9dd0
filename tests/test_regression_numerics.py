"""Cross-machine regression pins of the numerical core, on small fixed tensors (no convolution, no training).

What is pinned (values in ``tests/golden.json``, section ``numerics``):

- the per-sample losses of :mod:`groupdistil.losses` (KD term at several temperatures, CE, soft Dice, the
  classification / segmentation / multi-head totals) on logits and labels built from integers (exact in float32);
- the EG group-weight step of :mod:`groupdistil.weighting` (plain, with the generalisation adjustment, with
  normalised losses, an absent group) and the objective of ``GroupWeights.forward``;
- one optimizer step of every method (:mod:`groupdistil.methods`) on a linear student: the logged values and the
  student's weights after the step (so the gradient of the weighted objective is pinned too);
- the M&Ms metrics (:mod:`mms_pipeline.metrics`: Dice, Jaccard, Hausdorff, HD95, ASSD with the empty conventions,
  clinical indices, per-group summaries) on fixed label volumes, and the Waterbirds accuracies on fixed predictions.

Besides the pins, the KD term and the EG step are checked against float64 re-implementations of their formulas.

Tolerances are measured (docs/reproducibility.md): float32 values moved by at most ~1e-6 relative (3e-8
absolute) between torch CPU kernels (``ATEN_CPU_CAPABILITY`` default / avx2 / avx512), thread counts, oneDNN/MKL
ISA limits, numpy SIMD levels and package versions; ``REL_FLOAT32`` is well above that and far below a real
change (dropping the tau^2 of the KD term or flipping the sign of the EG step moved the pinned values by 4e-4 to
several times their size: 40 times the tolerance and more).
The metrics are float64 on integer geometry and did not move at all.

Regenerate on purpose with ``GROUPDISTIL_UPDATE_GOLDEN=1 python -m pytest tests/test_regression_numerics.py``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from golden_io import GOLDEN, load_section, tree_diffs, write_section
from torch import nn

from groupdistil.losses import (
    ClassificationLoss,
    SegmentationLoss,
    SoftDice,
    TaskLoss,
    kd_term,
    per_sample_ce,
)
from groupdistil.methods import METHODS
from groupdistil.weighting import GroupWeights, reduced_group_means

UPDATE = os.environ.get("GROUPDISTIL_UPDATE_GOLDEN") == "1"
SECTION = "numerics"

#: float32 losses, EG weights and one SGD step on fixed tensors. Measured spread over every variant tried
#: (docs/reproducibility.md): losses <= 6e-8 relative, group weights <= 3.3e-7, weights after one SGD step
#: <= 3e-8 absolute (1.1e-6 relative on a small weight); the bands are ~10-30x that
REL_FLOAT32, ABS_FLOAT32 = 1e-5, 1e-6
#: float64 metrics on integer geometry (measured spread: 0)
REL_FLOAT64, ABS_FLOAT64 = 1e-9, 1e-12








def check_golden(section: str, key: str, got: Any, rel: float, abs_: float) -> None:
    """Compare ``got`` with ``golden[section][key]``; with GROUPDISTIL_UPDATE_GOLDEN=1 store it instead."""
    got = json.loads(json.dumps(got))  # tuples -> lists, numpy scalars must already be Python numbers
    if UPDATE:
        values = load_section(section) or {}
        values[key] = got
        write_section(section, values)
        return
    golden = load_section(section)
    if golden is None or key not in golden:
        pytest.fail(f"{GOLDEN} has no {section}/{key}: run GROUPDISTIL_UPDATE_GOLDEN=1 python -m pytest "
                    f"{Path(__file__).name} once, review the file and commit it")
    diffs = tree_diffs(got, golden[key], rel, abs_, f"{section}/{key}")
    assert not diffs, "values changed (regenerate tests/golden.json only on purpose):\n" + "\n".join(diffs[:40])


# --- fixed inputs: integers only, exact in float32 --------------------------------------------------------------
def ints(shape: tuple[int, ...], a: int, b: int, m: int) -> torch.Tensor:
    """``(a * i + b) mod m`` over the flat index ``i``, int64 of ``shape``."""
    return ((torch.arange(math.prod(shape), dtype=torch.int64) * a + b) % m).reshape(shape)


def logits(shape: tuple[int, ...], a: int, b: int) -> torch.Tensor:
    """Float32 logits in [-4, 4) in steps of 1/8 (exactly representable)."""
    return (ints(shape, a, b, 64).float() - 32.0) / 8.0


def floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().flatten().tolist()]


CLS = {"s": logits((6, 5), 13, 5), "t": logits((6, 5), 29, 17), "y": ints((6,), 3, 1, 5)}
SEG = {"s": logits((3, 4, 8, 8), 37, 3), "t": logits((3, 4, 8, 8), 11, 41), "y": ints((3, 1, 8, 8), 7, 2, 4)}
LOSS_CFG = {"alpha": 0.5, "tau": 4.0, "lambda_dice": 1.0, "lambda_ce": 1.0, "lambda_kd": 1.0}


def loss_values() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for tau in (1.0, 2.0, 4.0):
        out[f"kd_cls_tau{tau:g}"] = floats(kd_term(CLS["s"], CLS["t"], tau))
        out[f"kd_seg_tau{tau:g}"] = floats(kd_term(SEG["s"], SEG["t"], tau))
    out["ce_cls"] = floats(per_sample_ce(CLS["s"], CLS["y"]))
    out["ce_seg"] = floats(per_sample_ce(SEG["s"], SEG["y"]))
    out["dice_seg"] = floats(SoftDice()(SEG["s"], SEG["y"]))
    for name, parts in (("cls_loss", ClassificationLoss(0.5, 4.0)(CLS["s"], CLS["y"], CLS["t"])),
                        ("seg_loss", SegmentationLoss(1.0, 1.0, 0.5, tau=2.0)(SEG["s"], SEG["y"], SEG["t"]))):
        for term, v in parts.items():
            out[f"{name}/{term}"] = floats(v)
    task = TaskLoss({"seg": 1.0, "cls": 0.2}, LOSS_CFG)
    parts = task({"seg": SEG["s"], "cls": CLS["s"][:3]}, {"seg": SEG["y"], "cls": CLS["y"][:3]},
                 {"seg": SEG["t"], "cls": CLS["t"][:3]})
    out.update({f"task/{k}": floats(v) for k, v in parts.items()})
    return out


GROUP_LOSSES = torch.tensor([[1.5, 0.25, 2.0, 0.0], [0.75, 1.25, 0.5, 3.0], [2.5, 0.125, 1.0, 0.5]])
GROUP_COUNTS = torch.tensor([[5.0, 2.0, 1.0, 0.0], [3.0, 3.0, 2.0, 0.0], [4.0, 0.0, 3.0, 1.0]])
TRAIN_COUNTS = [30, 6, 4, 0]


def eg_variants() -> dict[str, dict[str, Any]]:
    return {"plain": {"eta": 0.1}, "adjusted": {"eta": 0.1, "adj_c": 1.0, "train_counts": TRAIN_COUNTS},
            "normalized": {"eta": 0.5, "normalize_loss": True}, "large_eta": {"eta": 2.0}}


def weighting_values() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kw in eg_variants().items():
        w = GroupWeights(4, **kw)
        out[f"eg_{name}"] = [floats(w.step(loss, count)) for loss, count in zip(GROUP_LOSSES, GROUP_COUNTS)]
    losses = (ints((10,), 7, 3, 16).float() + 1.0) / 4.0
    groups = ints((10,), 3, 1, 3)  # group 3 absent
    _, means, counts = reduced_group_means(losses, groups, 4)
    w = GroupWeights(4, eta=0.1)
    objective, logs = w(losses, groups)
    out["group_means"] = floats(means)
    out["group_counts"] = floats(counts)
    out["forward_objective"] = float(objective)
    out["forward_weights"] = floats(logs["group_weight"])
    return out


class _Linear(nn.Module):
    """A linear classifier with fixed weights, returning ``{"cls": logits}`` like the pipelines' models."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.fc.weight.copy_((ints((4, 6), 5, 1, 9).float() - 4.0) / 8.0)
            self.fc.bias.copy_(torch.tensor([0.125, -0.25, 0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cls": self.fc(x)}


def method_values() -> dict[str, Any]:
    batch = {"x": (ints((8, 6), 11, 3, 17).float() - 8.0) / 4.0, "cls": ints((8,), 3, 2, 4),
             "group": torch.tensor([0, 0, 1, 0, 2, 0, 1, 0])}  # group 3 absent
    teacher_logits = logits((8, 4), 19, 7)
    out: dict[str, Any] = {}
    for name in ("erm", "kd", "groupdro", "groupdistil"):
        cls = METHODS.get(name)
        student = _Linear()
        teacher = (lambda b: {"cls": teacher_logits}) if cls.needs_teacher else None
        hparams = {"eta": 0.5} if name in ("groupdro", "groupdistil") else {}
        method = cls(student, TaskLoss({"cls": 1.0}, LOSS_CFG), 4, TRAIN_COUNTS, hparams, teacher=teacher)
        method.optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
        logs = method.update({k: v.clone() for k, v in batch.items()})
        out[name] = {"logs": {k: floats(v) for k, v in sorted(logs.items())},
                     "weight_after": floats(student.fc.weight), "bias_after": floats(student.fc.bias)}
    return out


def _disk(shape: tuple[int, int, int], cx: int, cy: int, r2: int, z: range) -> np.ndarray:
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    m = np.zeros(shape, bool)
    m[..., z.start:z.stop] = (((x - cx) ** 2 + (y - cy) ** 2) <= r2)[..., None]
    return m


def label_volume(shift: int, lv_r2: int, myo_r2: int, rv: bool, lv: bool = True) -> np.ndarray:
    """A phantom (x, y, z) label volume from integer geometry: LV disk, MYO ring, RV box."""
    shape = (24, 20, 5)
    labels = np.zeros(shape, np.uint8)
    labels[_disk(shape, 12 + shift, 10, myo_r2, range(4))] = 2
    if lv:
        labels[_disk(shape, 12 + shift, 10, lv_r2, range(4))] = 1
    if rv:
        labels[2 + shift:7 + shift, 4:15, 0:3] = 3
    return labels


SPACING = (1.25, 1.5, 8.0)


def metric_values() -> dict[str, Any]:
    from mms_pipeline.metrics import case_metrics, clinical_indices, summarise

    gt = label_volume(0, 16, 36, True)
    cases = {
        "overlap": (label_volume(1, 9, 36, True), gt),
        "empty_pred_rv": (label_volume(0, 25, 49, False), gt),
        "both_empty_lv": (label_volume(-1, 16, 25, True, lv=False), label_volume(0, 16, 36, True, lv=False)),
    }
    out: dict[str, Any] = {"case": {k: case_metrics(p, g, SPACING) for k, (p, g) in cases.items()}}
    out["clinical"] = clinical_indices(cases["overlap"][0], cases["empty_pred_rv"][0], gt, gt, SPACING, SPACING)
    rows = [{"Name": k, "ED/ES": "ED", "Vendor": "AB"[i % 2], "Centre": 1, **m}
            for i, (k, m) in enumerate(out["case"].items())]
    summary = summarise(rows, "Vendor")
    out["summary"] = {g: {m: s for m, s in stats.items()} for g, stats in summary.items()}

    from waterbirds_pipeline.metrics import accuracy_summary

    y = ints((40,), 1, 0, 2).numpy()
    group = (2 * y + ints((40,), 3, 1, 2).numpy()) % 4
    pred = np.where(ints((40,), 7, 2, 5).numpy() == 0, 1 - y, y)
    names = ["landbird_land", "landbird_water", "waterbird_land", "waterbird_water"]
    out["waterbirds"] = accuracy_summary(pred, y, group, names, [3498, 184, 56, 1057])
    keep = group != 1  # one group absent from the split
    out["waterbirds_absent_group"] = accuracy_summary(pred[keep], y[keep], group[keep], names, [3498, 184, 56, 1057])
    return out


def observations() -> dict[str, Any]:
    """Everything this file pins (also used to measure the tolerances on other kernels and versions)."""
    return {"losses": loss_values(), "weighting": weighting_values(), "methods": method_values(),
            "metrics": metric_values()}


# --- the pins ---------------------------------------------------------------------------------------------------
def test_losses_match_golden() -> None:
    check_golden(SECTION, "losses", loss_values(), REL_FLOAT32, ABS_FLOAT32)


def test_group_weighting_matches_golden() -> None:
    check_golden(SECTION, "weighting", weighting_values(), REL_FLOAT32, ABS_FLOAT32)


def test_one_step_of_each_method_matches_golden() -> None:
    check_golden(SECTION, "methods", method_values(), REL_FLOAT32, ABS_FLOAT32)


def test_metrics_match_golden() -> None:
    check_golden(SECTION, "metrics", metric_values(), REL_FLOAT64, ABS_FLOAT64)


# --- the formulas, independently in float64 ---------------------------------------------------------------------
def _log_softmax64(z: torch.Tensor, tau: float) -> torch.Tensor:
    z = z.double() / tau
    return z - torch.logsumexp(z, dim=1, keepdim=True)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_kd_term_is_the_scaled_kl(tau: float) -> None:
    for s, t in ((CLS["s"], CLS["t"]), (SEG["s"], SEG["t"])):
        lt, ls = _log_softmax64(t, tau), _log_softmax64(s, tau)
        want = (tau * tau) * (lt.exp() * (lt - ls)).sum(1).flatten(1).mean(1) if s.dim() > 2 else \
            (tau * tau) * (lt.exp() * (lt - ls)).sum(1)
        torch.testing.assert_close(kd_term(s, t, tau).double(), want, rtol=1e-5, atol=1e-7)
        assert float(kd_term(s, s, tau).abs().max()) < 1e-6


def test_classification_loss_mixes_ce_and_kd() -> None:
    parts = ClassificationLoss(0.25, 2.0)(CLS["s"], CLS["y"], CLS["t"])
    ce = -_log_softmax64(CLS["s"], 1.0).gather(1, CLS["y"][:, None])[:, 0]
    torch.testing.assert_close(parts["ce"].double(), ce, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts["total"], 0.25 * parts["ce"] + 0.75 * parts["kd"])


@pytest.mark.parametrize("variant", sorted(eg_variants()))
def test_eg_step_matches_the_formula(variant: str) -> None:
    """``a = l + C / sqrt(n_g)``, normalised over the present groups with ``normalize_loss``,
    ``q <- q * exp(eta * a)`` on the present groups, renormalised; groups without training samples keep weight 0."""
    kw = eg_variants()[variant]
    trained = np.asarray(kw.get("train_counts", [1] * 4)) > 0
    adj = np.zeros(4)
    if kw.get("adj_c"):
        adj = kw["adj_c"] / np.sqrt(np.maximum(np.asarray(kw["train_counts"], float), 1))
    w = GroupWeights(4, **kw)
    q = np.where(trained, 1.0 / trained.sum(), 0.0)
    for loss_t, count_t in zip(GROUP_LOSSES, GROUP_COUNTS):
        present = count_t.numpy() > 0
        a = loss_t.double().numpy() + adj
        if kw.get("normalize_loss"):
            a = a / max(a[present].sum(), 1e-12)
        q = q * np.exp(np.where(present, kw["eta"] * a, 0.0))
        q = q / q.sum()
        got = w.step(loss_t, count_t).double().numpy()
        np.testing.assert_allclose(got, q, rtol=1e-5, atol=1e-7)
        assert abs(got.sum() - 1) < 1e-6 and (got >= 0).all() and (got[~trained] == 0).all()
    # the weight of the group with the highest loss rises (the ascent direction)
    w = GroupWeights(4, eta=0.1)
    q1 = w.step(torch.tensor([0.5, 2.0, 1.0, 1.0]), torch.ones(4))
    assert int(q1.argmax()) == 1 and float(q1[1]) > 0.25 > float(q1[0])
