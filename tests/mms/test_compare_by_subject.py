"""``compare`` on M&Ms: the per-case tests treat a subject's ED and ES volumes as one unit (their mean Dice averaged
first), so the Wilcoxon test and the paired bootstrap count subjects; checked against a hand computation."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from numpy.testing import assert_allclose

from groupdistil.experiments.plan import RunSpec
from groupdistil.experiments.report import ci_note, nice_metric
from groupdistil.experiments.summary import AVERAGE, WORST, _pair_tests
from mms_pipeline.metrics import STRUCTURES, write_per_case_csv
from mms_pipeline.pipeline import MMSPipeline

#: mean Dice (every structure the same) of each subject's (ED, ES) volumes, per method
DICE = {
    "kd": {"a1": (0.9, 0.9), "a2": (0.7, 0.9), "b1": (0.8, 0.6), "b2": (0.9, 0.7), "b3": (0.5, 0.5), "b4": (0.6, 0.8),
           "b5": (0.95, 0.85)},
    "erm": {"a1": (0.8, 0.8), "a2": (0.9, 0.9), "b1": (0.6, 0.6), "b2": (0.85, 0.85), "b3": (0.3, 0.4),
            "b4": (0.5, 0.5), "b5": (0.5, 0.6)},
}


def fake_run(tmp_path: Path, method: str) -> RunSpec:
    run_dir = tmp_path / method
    run_dir.mkdir()
    rows = [{"Name": code, "ED/ES": ph, "Vendor": code[0].upper(), "Centre": "1" if code[0] == "a" else "2",
             **{f"Dice {s}": d for s in STRUCTURES}}
            for code, (ed, es) in DICE[method].items() for ph, d in (("ED", ed), ("ES", es))]
    write_per_case_csv(run_dir / "per_case.csv", rows)
    means = {g: sum(sum(v) / 2 for c, v in DICE[method].items() if c[0] == g.lower()) / (2 if g == "A" else 5)
             for g in "AB"}
    spec = RunSpec(method, 0, {}, {}, {}, run_dir, tmp_path)
    spec.result = {WORST: min(means.values()), AVERAGE: 0.0, **{f"group.{g}": m for g, m in means.items()}}
    return spec


def test_case_scores_average_the_phases_of_a_subject(tmp_path: Path) -> None:
    scores = MMSPipeline.case_scores(fake_run(tmp_path, "kd").run_dir)
    assert [c for c, _, _ in scores] == list(DICE["kd"])
    assert_allclose([s for _, _, s in scores], [0.9, 0.8, 0.7, 0.8, 0.5, 0.7, 0.9])
    assert {g for _, g, _ in scores} == {"A", "B"}


def test_wilcoxon_and_bootstrap_count_subjects_by_hand(tmp_path: Path) -> None:
    kd, erm = fake_run(tmp_path, "kd"), fake_run(tmp_path, "erm")
    rows = _pair_tests([kd], [erm], MMSPipeline)
    assert [r.test for r in rows[:2]] == [None, None]  # one seed: no t-test
    wilcoxon = rows[2]
    # erm's worst group is B (0.57 < 0.85). Per subject of B, kd - erm:
    # b1 0.7 - 0.6 = 0.1, b2 0.8 - 0.85 = -0.05, b3 0.5 - 0.35 = 0.15, b4 0.7 - 0.5 = 0.2, b5 0.9 - 0.55 = 0.35
    # ranks of |d|: 0.05 -> 1, 0.1 -> 2, 0.15 -> 3, 0.2 -> 4, 0.35 -> 5; W+ = 14, W- = 1; statistic min = 1;
    # exact two-sided p: sign patterns with W- <= 1 are 2 of 2^5, doubled: 4 / 32 = 0.125
    assert wilcoxon.metric == "group.B" and wilcoxon.test.test == "Wilcoxon (subjects)"
    assert wilcoxon.test.n == 5  # subjects, not 10 volumes
    assert_allclose(wilcoxon.test.statistic, 1.0)
    assert_allclose(wilcoxon.test.p, 0.125)
    assert_allclose(wilcoxon.test.mean_diff, (0.1 - 0.05 + 0.15 + 0.2 + 0.35) / 5)
    worst, on_b = rows[3:]
    assert worst.test.test == on_b.test.test == "paired bootstrap (subjects)"
    assert worst.test.n == 7 and on_b.test.n == 5  # subjects resampled
    assert_allclose(worst.test.mean_diff, 0.72 - 0.57)  # min over group means of kd minus that of erm
    assert_allclose(on_b.test.mean_diff, 0.15)
    assert worst.test.ci_low <= worst.test.mean_diff <= worst.test.ci_high and math.isnan(worst.test.p)


def test_the_report_names_the_unit() -> None:
    assert nice_metric("group.B", "erm", MMSPipeline.case_unit) == "subjects of B (worst group of erm)"
    assert ci_note(MMSPipeline.case_unit).startswith("Paired bootstrap (subjects): first − second method on the same "
                                                     "test subjects")
    assert MMSPipeline.case_unit == "subjects"
