"""What ``groupdistil compare`` reads from finished M&Ms runs (their ``per_case.csv`` and ``config.yaml``) beyond
``metrics.json``: :class:`MMSComparison`, the pipeline's :class:`~groupdistil.pipeline.ComparisonHooks`. One score
per subject for the paired per-case tests (:func:`case_scores`), and the Dice and HD95 of each structure per group
for the comparison's table (:func:`group_breakdown`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from groupdistil.pipeline import ComparisonHooks, GroupBreakdown

from .config import metric_and_grouping
from .metrics import STRUCTURES, mean_dice, read_per_case_csv, summarise
from .report import PER_CASE_FILE
from .splits import group_column, group_title


def run_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.yaml`` of a run folder ({} when there is none)."""
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


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


class MMSComparison(ComparisonHooks):
    """The comparison hooks of :class:`~mms_pipeline.pipeline.MMSPipeline` (``MMSPipeline.comparison``): scores
    per subject, the table per structure and group, vendor and centre names."""

    case_unit = "subjects"

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        metric, group = metric_and_grouping(cfg)
        if metric == "accuracy":
            return (f"Worst-group metric: the subject-level pathology classification accuracy of the worst test "
                    f"{group}. Average metric: the accuracy over all test subjects. Per-case test: each subject "
                    f"scored 1 if its pathology was right, 0 if not.")
        return (f"Worst-group metric: the mean Dice (over LV, MYO, RV and the ED and ES phases) of the worst test "
                f"{group}. Average metric: the mean Dice over all test cases.")

    @classmethod
    def case_scores(cls, run_dir: Path) -> list[tuple[str, str, float]] | None:
        """One test score per subject, on the run's own metric (:func:`case_scores`: a subject's ED and ES mean Dice
        averaged; or whether its pathology was right)."""
        metric, group_by = metric_and_grouping(run_config(Path(run_dir)))
        return case_scores(Path(run_dir) / PER_CASE_FILE, metric, group_by)

    @classmethod
    def group_breakdown(cls, run_dir: Path) -> GroupBreakdown | None:
        """Dice and HD95 of LV, MYO, RV per group and n subjects (:func:`group_breakdown`)."""
        _, group_by = metric_and_grouping(run_config(Path(run_dir)))
        return group_breakdown(Path(run_dir) / PER_CASE_FILE, group_by)

    @classmethod
    def group_label(cls, group: str, cfg: dict[str, Any]) -> str:
        return group_title(group, metric_and_grouping(cfg)[1])
