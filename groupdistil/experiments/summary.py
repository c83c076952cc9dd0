"""The results of a finished grid: each run's test metrics, runs grouped by variant, and the paired tests.

Statistics: :mod:`groupdistil.stats`. A pair ``[A, B]`` of the experiment compares, within each data level, every
variant of A with every variant of B whose swept values agree on their common keys: a paired t-test across seeds on
the worst-group and the average metric and, when the pipeline's ``case_scores`` gives per-case scores, a Wilcoxon
test across the cases of B's worst group (the group with the lowest mean over B's seeds; a case is one independent
unit, the pipeline's ``case_unit``: M&Ms averages a subject's ED and ES volumes, so n = subjects). With per-case
scores each pair also gets paired bootstrap CIs over cases (:func:`groupdistil.stats.paired_bootstrap`, each case's
score averaged over the common seeds, the cases of one unit resampled together): of the worst-group difference
``min_g mean_g(A) - min_g mean_g(B)`` and of the mean difference on the cases of B's worst group. The p-values of all
the tests of one experiment file are Holm-adjusted together (:func:`groupdistil.stats.holm`, ``PairRow.p_holm``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..pipeline import Pipeline
from ..stats import PairedTest, case_unit, holm, mean_std, pair_cases, paired_bootstrap, paired_t, wilcoxon_paired
from .plan import RunSpec
from .schema import Experiment

WORST, AVERAGE = "worst_group_metric", "average_metric"
#: validation metrics of the selected checkpoint: what defaults are chosen on (never the test split)
VAL_WORST, VAL_AVERAGE = "val.worst_group_metric", "val.average_metric"


def read_results(specs: list[RunSpec]) -> list[str]:
    """Fill each spec's ``result`` with its test metrics (flat: worst, average, ``group.<name>``) and its validation
    worst and average (``val.*``); return the group names."""
    groups: list[str] = []
    for spec in specs:
        m = json.loads((spec.run_dir / "metrics.json").read_text())
        test, val = m["test"], m["val"]
        spec.result = {WORST: float(test[WORST]), AVERAGE: float(test[AVERAGE]),
                       **{f"group.{g}": float(v) for g, v in test["group_metric"].items()},
                       VAL_WORST: float(val[WORST]), VAL_AVERAGE: float(val[AVERAGE])}
        spec.groups = list(m.get("groups") or test["group_metric"])
        groups += [g for g in spec.groups if g not in groups]
    return groups


def by_variant(specs: list[RunSpec]) -> dict[tuple[str, str, str], list[RunSpec]]:
    """The runs of each variant (data level, method, swept values), in plan order."""
    out: dict[tuple[str, str, str], list[RunSpec]] = {}
    for s in specs:
        out.setdefault(s.variant, []).append(s)
    return out


@dataclass
class PairRow:
    level: dict[str, Any]
    a: RunSpec  # a representative run of each side (for its method and params)
    b: RunSpec
    metric: str
    test: PairedTest | None
    p_holm: float = math.nan  # the test's p, Holm-adjusted over every test of the experiment file

    @property
    def title(self) -> str:
        return f"{self.a.title} − {self.b.title}"


def _compatible(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def paired_comparisons(exp: Experiment, specs: list[RunSpec], pipeline_cls: type[Pipeline]) -> list[PairRow]:
    """For each data level, pair and each compatible pair of variants: paired t across seeds (worst-group and
    average metric) and, when the pipeline has per-case scores, Wilcoxon across cases of B's worst group."""
    groups = by_variant(specs)
    rows: list[PairRow] = []
    for (lv, method, _), runs_a in groups.items():
        for a_name, b_name in exp.pairs:
            if method != a_name:
                continue
            for (lv_b, m_b, _), runs_b in groups.items():
                if lv_b != lv or m_b != b_name or not _compatible(runs_a[0].params, runs_b[0].params):
                    continue
                rows += _pair_tests(runs_a, runs_b, pipeline_cls)
    adjusted = holm([r.test.p if r.test is not None else math.nan for r in rows])
    for r, p in zip(rows, adjusted):
        r.p_holm = float(p)
    return rows


def _pair_tests(runs_a: list[RunSpec], runs_b: list[RunSpec], pipeline_cls: type[Pipeline]) -> list[PairRow]:
    b_by_seed = {s.seed: s for s in runs_b}
    pairs = [(a, b_by_seed[a.seed]) for a in runs_a if a.seed in b_by_seed]
    a0, b0, lv = runs_a[0], runs_b[0], runs_a[0].level
    rows = [PairRow(lv, a0, b0, m, paired_t([a.result[m] for a, _ in pairs], [b.result[m] for _, b in pairs]))
            for m in (WORST, AVERAGE)]
    group_means = {k[len("group."):]: mean_std([b.result[k] for b in runs_b]).mean
                   for k in b0.result if k.startswith("group.")}
    if not group_means or not pairs:
        return rows
    worst = min(group_means, key=group_means.__getitem__)
    hooks = pipeline_cls.comparison
    scores = [(hooks.case_scores(a.run_dir), hooks.case_scores(b.run_dir)) for a, b in pairs]
    if all(sa is not None and sb is not None for sa, sb in scores):
        unit = hooks.case_unit
        _, xa, xb = pair_cases([sa for sa, _ in scores], [sb for _, sb in scores], worst)
        rows.append(PairRow(lv, a0, b0, f"group.{worst}", wilcoxon_paired(xa, xb, unit)))
        rows += _bootstrap_rows(lv, a0, b0, scores, list(group_means), worst, unit)
    return rows


def bootstrap_test(unit: str = "cases") -> str:
    """The name of the paired bootstrap rows: ``paired bootstrap (<unit>)``, the unit resampled."""
    return f"paired bootstrap ({unit})"


def _bootstrap_rows(lv: dict[str, Any], a0: RunSpec, b0: RunSpec, scores: list[tuple[Any, Any]], groups: list[str],
                    worst: str, unit: str = "cases") -> list[PairRow]:
    """Paired bootstrap CIs over the seed-averaged per-case scores: the worst-group difference (groups resampled
    independently, the cases of one unit together) and the mean difference on the cases of B's worst group."""
    ids, xa, xb, gs = [], [], [], []
    for g in groups:
        g_ids, g_a, g_b = pair_cases([sa for sa, _ in scores], [sb for _, sb in scores], g)
        ids += g_ids
        xa += g_a
        xb += g_b
        gs += [g] * len(g_ids)
    if not ids:
        return []
    _, cis = paired_bootstrap(xa, xb, gs, [case_unit(i) for i in ids])
    rows = []
    for metric, key in ((WORST, "worst"), (f"group.{worst}", worst)):
        if key not in cis:
            continue
        ci = cis[key]
        rows.append(PairRow(lv, a0, b0, metric, PairedTest(bootstrap_test(unit), ci.n, ci.estimate, ci.low, ci.high,
                                                           math.nan, math.nan)))
    return rows
