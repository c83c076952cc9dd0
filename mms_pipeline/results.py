"""What ``compare`` reads from a finished M&Ms run folder (its ``per_case.csv`` and ``config.yaml``): one score per
subject for the paired per-case tests (:func:`case_scores`), and the Dice and HD95 of each structure per group for
the comparison's table (:func:`group_breakdown`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from groupdistil.pipeline import GroupBreakdown

from .metrics import STRUCTURES, mean_dice, read_per_case_csv, summarise


def run_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.yaml`` of a run folder ({} when there is none)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def group_column(group_by: str) -> str:
    """The per-case column of the groups of ``data.group_by``."""
    return "Vendor" if group_by == "vendor" else "Centre"


def subject_means(scores: list[tuple[str, str, float]]) -> list[tuple[str, str, float]]:
    """``(subject, group, mean of the subject's scores)``, subjects in order of first appearance: the per-volume
    scores of one subject (ED and ES) folded into one."""
    acc: dict[tuple[str, str], list[float]] = {}
    for code, group, score in scores:
        acc.setdefault((code, group), []).append(float(score))
    return [(code, group, float(np.mean(v))) for (code, group), v in acc.items()]


def case_scores(per_case: Path, metric: str, group_by: str) -> list[tuple[str, str, float]] | None:
    """Per-subject test scores for the paired per-case tests, on the run's own metric (``eval.metric``):
    ``("<code>", group, (mean Dice ED + mean Dice ES) / 2)``: the ED and ES volumes of one subject are not
    independent, so they are averaged into one score per subject (the unit of the Wilcoxon test and of the
    bootstrap); with ``accuracy`` ``("<code>", group, 1.0 | 0.0)``: whether the subject's pathology was classified
    correctly. None without a ``per_case.csv``."""
    if not Path(per_case).exists():
        return None
    key = group_column(group_by)
    rows = read_per_case_csv(per_case)
    if metric == "accuracy":
        return [(str(r["Name"]), str(r[key]), float(r["cls_correct"]))
                for r in rows if not math.isnan(r.get("cls_correct", math.nan))]
    return subject_means([(str(r["Name"]), str(r[key]), mean_dice(r)) for r in rows])


#: the columns of the comparison's table: (title, per-case metric, higher is better, digits)
BREAKDOWN = [(f"Dice {s}", f"Dice {s}", True, 3) for s in STRUCTURES] + \
            [(f"HD95 {s} (mm)", f"HD95 {s}", False, 2) for s in STRUCTURES]
BREAKDOWN_NOTE = ("Dice: mean over the group's ED and ES volumes; HD95: mean over the volumes where prediction and "
                  "truth both hold the structure (an empty one, recorded as -1, is left out).")


def group_breakdown(per_case: Path, group_by: str) -> GroupBreakdown | None:
    """Dice and HD95 of LV, MYO and RV per group (``data.group_by``: vendor or centre) from a run's
    ``per_case.csv`` (:func:`mms_pipeline.metrics.summarise`: the numbers of the run's own report), with the number
    of subjects of each group; None without a ``per_case.csv``."""
    if not Path(per_case).exists():
        return None
    key = group_column(group_by)
    rows = read_per_case_csv(per_case)
    summary = summarise(rows, key)
    groups = sorted((g for g in summary if g != "worst"), key=lambda g: (len(g), g))

    def mean(g: str, m: str) -> float:
        value = summary[g].get(m, {}).get("mean")
        return math.nan if value is None else float(value)

    return GroupBreakdown(
        group_by, tuple(t for t, _, _, _ in BREAKDOWN), tuple(h for _, _, h, _ in BREAKDOWN),
        tuple(d for _, _, _, d in BREAKDOWN), {g: {t: mean(g, m) for t, m, _, _ in BREAKDOWN} for g in groups},
        {g: len({r["Name"] for r in rows if str(r[key]) == g}) for g in groups}, BREAKDOWN_NOTE)
