"""Statistics of a multi-seed comparison.

- :func:`mean_std`: mean and *sample* standard deviation (ddof = 1) over seeds; the std is NaN with one value.
- :func:`paired_t`: method A - method B paired by seed: mean difference ``d = mean(a_i - b_i)``, its 95% confidence
  interval ``d ± t_{0.975, n-1} * s_d / sqrt(n)`` (``s_d`` the sample std of the differences) and the two-sided
  paired t-test (``scipy.stats.ttest_rel``). Needs at least 2 pairs.
- :func:`pair_cases` + :func:`wilcoxon_paired`: per-case scores of two methods paired by case id within each seed,
  each case's score averaged over the seeds where both methods have it (so every case is one independent pair),
  then the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CaseScores = Sequence[tuple[str, str, float]]  # (case id, group, score), as Pipeline.case_scores returns


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float  # sample std (ddof = 1); NaN for n < 2
    n: int


@dataclass(frozen=True)
class PairedTest:
    """A test of ``a - b`` over ``n`` pairs; ``ci_*`` are NaN where the test gives no interval."""

    test: str
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    statistic: float
    p: float
    median_diff: float = math.nan


def mean_std(values: Sequence[float]) -> MeanStd:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return MeanStd(math.nan, math.nan, 0)
    return MeanStd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return np.asarray(a, dtype=float) - np.asarray(b, dtype=float)


def paired_t(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedTest | None:
    """Paired t-test of ``a - b`` with the mean difference and its confidence interval; None for < 2 pairs."""
    from scipy import stats

    d = _diffs(a, b)
    n = d.size
    if n < 2:
        return None
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        res = stats.ttest_rel(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
    return PairedTest("paired t (seeds)", n, mean, mean - half, mean + half, float(res.statistic), float(res.pvalue),
                      float(np.median(d)))


def wilcoxon_paired(a: Sequence[float], b: Sequence[float]) -> PairedTest | None:
    """Two-sided Wilcoxon signed-rank test of ``a - b``; None without pairs; p is NaN when all differences are 0."""
    from scipy import stats

    d = _diffs(a, b)
    if d.size == 0:
        return None
    stat, p = math.nan, math.nan
    if np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.wilcoxon(d)
        stat, p = float(res.statistic), float(res.pvalue)
    return PairedTest("Wilcoxon (cases)", int(d.size), float(d.mean()), math.nan, math.nan, stat, p,
                      float(np.median(d)))


def pair_cases(a_runs: Sequence[CaseScores], b_runs: Sequence[CaseScores],
               group: str) -> tuple[list[str], list[float], list[float]]:
    """Pair the cases of ``group`` by id within each seed (``a_runs[i]`` and ``b_runs[i]`` share a seed).

    Returns ``(ids, a, b)``: each case's score averaged over the seeds where both methods scored it, ids sorted.
    """
    if len(a_runs) != len(b_runs):
        raise ValueError("a_runs and b_runs must hold one entry per common seed")
    sums: dict[str, list[float]] = {}
    for ra, rb in zip(a_runs, b_runs):
        sa = {cid: s for cid, g, s in ra if g == group}
        sb = {cid: s for cid, g, s in rb if g == group}
        for cid in sa.keys() & sb.keys():
            acc = sums.setdefault(cid, [0.0, 0.0, 0.0])
            acc[0] += float(sa[cid])
            acc[1] += float(sb[cid])
            acc[2] += 1
    ids = sorted(sums)
    return ids, [sums[i][0] / sums[i][2] for i in ids], [sums[i][1] / sums[i][2] for i in ids]


def group_mean(values: Sequence[float] | np.ndarray, group: Sequence[int] | np.ndarray,
               n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean of ``values`` ``(N,)`` by integer ``group`` ``(N,)``: ``(means, counts)``, both ``(n_groups,)``;
    NaN for a group without values. The one place evaluation code computes group means."""
    group = np.asarray(group, dtype=np.int64)
    n = np.bincount(group, minlength=n_groups)
    sums = np.bincount(group, weights=np.asarray(values, dtype=np.float64), minlength=n_groups)
    return np.divide(sums, n, out=np.full(n_groups, np.nan), where=n > 0), n
