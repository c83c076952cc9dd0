"""``compare`` on M&Ms: the per-case tests treat a subject's ED and ES volumes as one unit (their mean Dice averaged
first), so the Wilcoxon test and the paired bootstrap count subjects (checked against a hand computation); the table
per structure and group (Dice and HD95 of LV, MYO, RV, n subjects, the worst group marked, vendor names)."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import yaml
from numpy.testing import assert_allclose

from groupdistil.experiments.plan import RunSpec
from groupdistil.experiments.report import WORST_MARK, Writer, ci_note, nice_metric
from groupdistil.report import Doc
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


def fake_run(tmp_path: Path, method: str, seed: int = 0, shift: float = 0.0, group_by: str = "vendor") -> RunSpec:
    """A finished M&Ms run folder with a per_case.csv of ``DICE[method]`` (+ ``shift``; every structure the same
    Dice d, HD95 = 10 (1 - d) mm, except an empty RV prediction of b3 ED: HD95 -1) and its config."""
    run_dir = tmp_path / f"{method}__seed={seed}"
    run_dir.mkdir()
    rows = [{"Name": code, "ED/ES": ph, "Vendor": code[0].upper(), "Centre": "1" if code[0] == "a" else "2",
             **{f"Dice {s}": d + shift for s in STRUCTURES}, **{f"HD95 {s}": 10 * (1 - d - shift) for s in STRUCTURES}}
            for code, (ed, es) in DICE[method].items() for ph, d in (("ED", ed), ("ES", es))]
    rows[8]["HD95 RV"] = -1.0  # b3 ED
    write_per_case_csv(run_dir / "per_case.csv", rows)
    cfg = {"pipeline": "mms", "method": method, "seed": seed, "data": {"group_by": group_by}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    means = {g: sum(sum(v) / 2 for c, v in DICE[method].items() if c[0] == g.lower()) / (2 if g == "A" else 5)
             for g in "AB"}
    spec = RunSpec(method, seed, {}, {}, cfg, run_dir, tmp_path)
    spec.result = {WORST: min(means.values()), AVERAGE: 0.0, **{f"group.{g}": m for g, m in means.items()}}
    return spec


def test_case_scores_average_the_phases_of_a_subject(tmp_path: Path) -> None:
    scores = MMSPipeline.comparison.case_scores(fake_run(tmp_path, "kd").run_dir)
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
    unit = MMSPipeline.comparison.case_unit
    assert nice_metric("group.B", "erm", unit) == "subjects of B, the worst group of erm"
    assert ci_note(unit).startswith("Paired bootstrap (subjects): first − second method on the same test subjects")
    assert unit == "subjects"


def writer(specs: list[RunSpec], tmp_path: Path) -> Writer:
    exp = SimpleNamespace(data_sweep={}, sweep={}, teacher_methods=[], methods=["kd", "erm"], metric_note="")
    return Writer(exp, MMSPipeline, specs, ["A", "B"], tmp_path)


def test_table_per_structure_and_vendor(tmp_path: Path) -> None:
    kd = [fake_run(tmp_path, "kd", 0), fake_run(tmp_path, "kd", 1, shift=0.02)]
    erm = [fake_run(tmp_path, "erm", 0)]
    doc = Doc()
    w = writer([*kd, *erm], tmp_path)
    w._level_tables(doc, [kd, erm], [], "")
    md = "\n".join(doc.md)
    assert "## Test per vendor and structure (mean ± std over seeds)" in md
    assert ("| method | vendor | n (subjects) | Dice LV | Dice MYO | Dice RV | HD95 LV (mm) | HD95 MYO (mm) | "
            "HD95 RV (mm) |") in md
    assert "| method | n | worst group | average | A (Siemens) | B (Philips) |" in md  # names beside the letters
    rows = {tuple(line.split(" | ")[:3]): line.split(" | ")[3:] for line in md.splitlines()
            if line.startswith("| kd") or line.startswith("| erm")}
    # kd, vendor B: subject means 0.72 (seed 0) and 0.74 (seed 1); Dice LV cell mean ± std over the seeds
    b = rows[("| kd", "B (Philips)", "5")]
    assert b[0] == f"0.730 ± {np.std([0.72, 0.74], ddof=1):.3f} {WORST_MARK}"
    # HD95 RV of B leaves out b3 ED (-1): seed 0 mean over 9 volumes of 10 (1 - d)
    d_b = [v for c, pair in DICE["kd"].items() if c[0] == "b" for v in pair]
    hd0 = np.mean([10 * (1 - d) for i, d in enumerate(d_b) if i != 4])
    hd1 = np.mean([10 * (1 - d - 0.02) for i, d in enumerate(d_b) if i != 4])
    assert b[5].startswith(f"{np.mean([hd0, hd1]):.2f} ± {np.std([hd0, hd1], ddof=1):.2f} {WORST_MARK}")
    a = rows[("| kd", "A (Siemens)", "2")]
    assert WORST_MARK not in " ".join(a) and a[0].startswith("0.860")  # (0.85 + 0.87) / 2
    assert rows[("| erm", "B (Philips)", "5")][0] == f"0.570 {WORST_MARK}"  # one seed: no std
    assert "lowest mean Dice, highest mean distance" in md and "(an empty one, recorded as -1, is left out)" in md


def test_table_per_centre_names_centres_with_their_vendor(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, "kd", 0, group_by="centre")]
    doc = Doc()
    writer(runs, tmp_path)._level_tables(doc, [runs], [], "")
    md = "\n".join(doc.md)
    assert "Test per centre and structure" in md and "| method | centre | n (subjects) |" in md
    assert "| kd | 1 (A, Siemens) | 2 |" in md and "| kd | 2 (B, Philips) | 5 |" in md


def test_waterbirds_keeps_its_per_group_table(tmp_path: Path) -> None:
    from waterbirds_pipeline.pipeline import WaterbirdsPipeline

    assert WaterbirdsPipeline.comparison.group_breakdown(tmp_path) is None
    assert WaterbirdsPipeline.comparison.group_label("landbird_land", {}) == "landbird_land"
