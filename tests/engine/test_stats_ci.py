"""Bootstrap confidence intervals and the Holm adjustment against hand computations."""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from groupdistil.stats import (
    BOOT_SEED,
    bootstrap_group_means,
    bootstrap_mean_ci,
    case_unit,
    holm,
    paired_bootstrap,
    percentile_ci,
)


def test_cluster_bootstrap_matches_the_documented_draws():
    # subjects s1..s3 with two volumes each (ED, ES): the unit resampled is the subject
    values = [0.9, 0.7, 0.5, 0.3, 0.8, 0.6]
    clusters = ["s1", "s1", "s2", "s2", "s3", "s3"]
    ci = bootstrap_mean_ci(values, clusters, n_boot=500, seed=7)
    # by hand: subject sums (1.6, 0.8, 1.4), two rows each; draws rng.integers(0, 3, size=(500, 3))
    sums, counts = np.array([1.6, 0.8, 1.4]), np.array([2.0, 2.0, 2.0])
    j = np.random.default_rng(7).integers(0, 3, size=(500, 3))
    means = sums[j].sum(1) / counts[j].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    assert ci.n == 3 and ci.n_boot == 500
    assert_allclose([ci.estimate, ci.low, ci.high], [np.mean(values), low, high])


def test_two_units_give_the_exact_percentile_interval():
    # two subjects of means 0 and 1: a resample mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of many resamples are exactly 0 and 1
    ci = bootstrap_mean_ci([0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"], n_boot=4000)
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)
    # one unit: every resample is the data, the interval is a point
    one = bootstrap_mean_ci([0.2, 0.4], ["a", "a"])
    assert_allclose([one.low, one.high], [0.3, 0.3])
    # rows without clusters are their own units; equal values give a point
    assert_allclose([bootstrap_mean_ci([0.7] * 5).low, bootstrap_mean_ci([0.7] * 5).high], [0.7, 0.7])


def test_stratified_groups_worst_and_weighted_by_hand():
    values = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    groups = ["g", "g", "g", "h", "h", "h", "h"]
    boot = bootstrap_group_means(values, groups, n_boot=300, seed=3)
    assert boot.groups == ["g", "h"] and boot.n_units.tolist() == [3, 4]
    rng = np.random.default_rng(3)  # groups in sorted order, each drawing all its resamples at once
    g = np.array([1.0, 0.0, 1.0])[rng.integers(0, 3, size=(300, 3))].mean(1)
    h = np.array([1.0, 0.0, 0.0, 1.0])[rng.integers(0, 4, size=(300, 4))].mean(1)
    assert_allclose(boot.samples[:, :, 0], np.stack([g, h], 1))
    worst = boot.worst_ci()
    assert_allclose([worst.estimate, worst.low, worst.high], [0.5, *np.percentile(np.minimum(g, h), [2.5, 97.5])])
    overall = boot.weighted_ci([3, 4])  # group sizes: the mean over all rows
    assert_allclose(overall.estimate, np.mean(values))
    assert_allclose([overall.low, overall.high], np.percentile((3 * g + 4 * h) / 7, [2.5, 97.5]))
    # the same seed gives the same intervals: reports are reproducible
    again = bootstrap_group_means(values, groups, n_boot=300, seed=3)
    assert np.array_equal(again.samples, boot.samples)
    assert BOOT_SEED == 0


def test_paired_bootstrap_resamples_both_methods_on_the_same_cases():
    a = [0.9, 0.8, 0.4, 0.6]
    b = [0.7, 0.8, 0.1, 0.2]
    groups = ["x", "x", "y", "y"]
    _, cis = paired_bootstrap(a, b, groups, None, n_boot=200, seed=5)
    rng = np.random.default_rng(5)
    jx, jy = rng.integers(0, 2, size=(200, 2)), rng.integers(0, 2, size=(200, 2))
    ax, bx = np.array(a[:2])[jx].mean(1), np.array(b[:2])[jx].mean(1)
    ay, by = np.array(a[2:])[jy].mean(1), np.array(b[2:])[jy].mean(1)
    d_worst = np.minimum(ax, ay) - np.minimum(bx, by)
    assert_allclose(cis["worst"].estimate, 0.5 - 0.15)
    assert_allclose([cis["worst"].low, cis["worst"].high], np.percentile(d_worst, [2.5, 97.5]))
    assert_allclose([cis["x"].low, cis["x"].high], np.percentile(ax - bx, [2.5, 97.5]))
    # identical scores: every paired difference is 0
    _, same = paired_bootstrap(a, a, groups, None)
    assert (same["worst"].low, same["worst"].high) == (0.0, 0.0)


def test_percentile_ci_without_units_is_nan():
    ci = percentile_ci(math.nan, np.array([]), 0)
    assert math.isnan(ci.low) and math.isnan(ci.high)


def test_case_unit():
    assert case_unit("A1B2C3 ED") == "A1B2C3" and case_unit("17") == "17"


def test_holm_matches_hand_computation():
    # sorted: 0.01 (x4), 0.02 (x3), 0.03 (x2), 0.04 (x1) -> 0.04, 0.06, 0.06 (running max), 0.06
    p = [0.03, 0.01, 0.04, 0.02]
    assert_allclose(holm(p), [0.06, 0.04, 0.06, 0.06])
    # NaN stays NaN and is not counted in m (m = 2 here): 0.2 x 2 = 0.4, then max(0.4, 0.6 x 1) = 0.6
    out = holm([0.6, math.nan, 0.2])
    assert_allclose(out[[0, 2]], [0.6, 0.4])
    assert math.isnan(out[1])
    assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])  # 0.6 x 2 = 1.2, capped at 1
    assert holm([]).shape == (0,) and math.isnan(holm([math.nan])[0])
    # ties keep input order and give the same adjusted value
    assert_allclose(holm([0.01, 0.01]), [0.02, 0.02])


@pytest.mark.parametrize("bad", [{"groups": ["g"]}, {"clusters": ["c", "d", "e"]}])
def test_lengths_must_agree(bad):
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_group_means([1.0, 2.0], **bad)


def test_compare_writes_bootstrap_rows_and_holm(tmp_path):
    """A toy comparison with per-case scores: paired bootstrap rows over cases and a p_holm column."""
    import csv
    import json

    import torch
    from test_compare import CaseToy, write_experiment

    from groupdistil.experiments import run_comparison

    torch.set_num_threads(1)
    exp = write_experiment(tmp_path, methods=["erm", "groupdro"], teacher_config="", seeds=[0, 1, 2],
                           pairs=[["groupdro", "erm"]], set={"method_args.eta": 2.0, "train.lr": 0.2})
    report = run_comparison(exp, tmp_path / "data", tmp_path / "out", pipeline_cls=CaseToy)
    out = tmp_path / "out"
    with open(out / "paired_tests.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert "p_holm" in rows[0]
    tested = [r for r in rows if r["p"] != ""]
    assert len(tested) == 3  # t-tests (worst, average) and Wilcoxon: one Holm family
    assert_allclose([float(r["p_holm"]) for r in tested], holm([float(r["p"]) for r in tested]))
    boot = [r for r in rows if r["test"] == "paired bootstrap (cases)"]
    assert boot[0]["metric"] == "worst_group_metric" and len(boot) == 2
    assert all(r["p"] == "" and r["p_holm"] == "" and r["ci95_low"] != "" for r in boot)
    # the worst-group estimate by hand: each case's score averaged over the two seeds, then min over group means
    def group_means(method):
        cases = {}
        for seed in (0, 1, 2):
            for cid, g, s in json.loads((out / "runs" / f"{method}__seed={seed}" / "cases.json").read_text()):
                cases.setdefault((cid, g), []).append(s)
        groups = {}
        for (_, g), s in cases.items():
            groups.setdefault(g, []).append(np.mean(s))
        return {g: np.mean(v) for g, v in groups.items()}

    dro, erm = group_means("groupdro"), group_means("erm")
    assert_allclose(float(boot[0]["mean_diff"]), min(dro.values()) - min(erm.values()))
    assert float(boot[0]["ci95_low"]) <= float(boot[0]["ci95_high"])
    page = report.read_text()
    assert "p (Holm)" in page and "paired bootstrap (cases)" in page
    assert "Paired bootstrap (cases): first − second method" in page
