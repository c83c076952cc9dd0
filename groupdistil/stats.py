"""Statistics of a multi-seed comparison.

- :func:`mean_std`: mean and *sample* standard deviation (ddof = 1) over seeds; the std is NaN with one value.
- :func:`paired_t`: method A - method B paired by seed: mean difference ``d = mean(a_i - b_i)``, its 95% confidence
  interval ``d ± t_{0.975, n-1} * s_d / sqrt(n)`` (``s_d`` the sample std of the differences) and the two-sided
  paired t-test (``scipy.stats.ttest_rel``). Needs at least 2 pairs.
- :func:`pair_cases` + :func:`wilcoxon_paired`: per-case scores of two methods paired by case id within each seed,
  each case's score averaged over the seeds where both methods have it (so every case is one independent pair),
  then the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped).
- :func:`bootstrap_group_means` (and :func:`bootstrap_mean_ci`, :func:`paired_bootstrap`): percentile bootstrap
  confidence intervals over cases, resampling whole clusters (a subject's ED and ES) within each group, seeded.
- :func:`holm`: Holm's step-down adjustment of the p-values of one family of tests.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CaseScores = Sequence[tuple[str, str, float]]  # (case id, group, score), as ComparisonHooks.case_scores returns


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


def wilcoxon_paired(a: Sequence[float], b: Sequence[float], unit: str = "cases") -> PairedTest | None:
    """Two-sided Wilcoxon signed-rank test of ``a - b`` (each pair one independent ``unit``: the test is named
    ``Wilcoxon (<unit>)``); None without pairs; p is NaN when all differences are 0."""
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
    return PairedTest(f"Wilcoxon ({unit})", int(d.size), float(d.mean()), math.nan, math.nan, stat, p,
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


# --- bootstrap confidence intervals and multiplicity -----------------------------------------------------------------
#: resamples and seed of every bootstrap in the reports (fixed: a report is reproducible to the last digit)
N_BOOT = 2000
BOOT_SEED = 0


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval: ``estimate`` (on the data as it is) and ``[low, high]``; ``n`` is the number
    of resampled units (NaN bounds without any unit)."""

    estimate: float
    low: float
    high: float
    n: int
    n_boot: int
    confidence: float = 0.95


@dataclass(frozen=True)
class GroupBootstrap:
    """Per-group means on the data and on ``n_boot`` stratified cluster resamples (:func:`bootstrap_group_means`).

    ``estimate`` ``(G, M)``: the mean of each value column in each group; ``samples`` ``(B, G, M)``: the same on each
    resample; ``n_units`` ``(G,)``: the units (clusters) of each group.
    """

    groups: list[str]
    estimate: np.ndarray
    samples: np.ndarray
    n_units: np.ndarray
    confidence: float = 0.95

    def index(self, group: str) -> int:
        return self.groups.index(group)

    def ci(self, estimate: float, samples: np.ndarray, n: int) -> BootstrapCI:
        """The percentile interval of a statistic given on the data (``estimate``) and per resample ``(B,)``."""
        return percentile_ci(estimate, samples, n, self.confidence)

    def group_ci(self, group: str, column: int = 0) -> BootstrapCI:
        """CI of one group's mean (column ``column``)."""
        g = self.index(group)
        return self.ci(float(self.estimate[g, column]), self.samples[:, g, column], int(self.n_units[g]))

    def worst_ci(self, column: int = 0) -> BootstrapCI:
        """CI of the lowest group mean ``min_g mean_g`` (the worst group may change from resample to resample)."""
        return self.ci(float(self.estimate[:, column].min()), self.samples[:, :, column].min(axis=1),
                       int(self.n_units.sum()))

    def weighted_ci(self, weights: Sequence[float], column: int = 0) -> BootstrapCI:
        """CI of ``sum_g w_g mean_g / sum_g w_g`` (fixed weights: e.g. training proportions, or the group sizes,
        which gives the mean over all cases since stratified resamples keep every group's size)."""
        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        return self.ci(float(self.estimate[:, column] @ w), self.samples[:, :, column] @ w, int(self.n_units.sum()))


def percentile_ci(estimate: float, samples: np.ndarray, n: int, confidence: float = 0.95) -> BootstrapCI:
    """``[q_{a/2}, q_{1-a/2}]`` of the resampled statistic, ``a = 1 - confidence``; quantiles with numpy's default
    (linear interpolation between order statistics)."""
    s = np.asarray(samples, dtype=np.float64)
    if n == 0 or s.size == 0 or not np.isfinite(estimate):
        return BootstrapCI(float(estimate), math.nan, math.nan, n, int(s.size), confidence)
    alpha = 1.0 - confidence
    low, high = np.percentile(s, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return BootstrapCI(float(estimate), float(low), float(high), n, int(s.size), confidence)


def case_unit(case_id: str) -> str:
    """The resampling unit of a per-case id: the text before the first space (M&Ms ``"<code> ED"`` and
    ``"<code> ES"`` are one subject); the whole id when it has none."""
    return str(case_id).split(" ", 1)[0]


def bootstrap_group_means(values: Sequence[float] | np.ndarray, groups: Sequence[str] | None = None,
                          clusters: Sequence[str] | None = None, group_names: Sequence[str] | None = None,
                          n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                          confidence: float = 0.95) -> GroupBootstrap:
    """Stratified cluster bootstrap of per-group means.

    ``values`` ``(N,)`` or ``(N, M)`` (M value columns resampled together: paired, e.g. methods A and B on the same
    cases), ``groups`` ``(N,)`` (one group "all" when None), ``clusters`` ``(N,)`` (the unit resampled whole: rows
    of one cluster stay together, e.g. the ED and ES volumes of one subject; each row its own unit when None).

    In group g, with its K_g clusters sorted by id, S_c the sum of the values of cluster c and n_c its number of
    rows, the estimate is ``mean_g = sum_c S_c / sum_c n_c`` (the mean over the group's rows). One resample draws
    K_g cluster indices j_1..j_K uniformly with replacement and gives ``mean*_g = sum_k S_{j_k} / sum_k n_{j_k}``.
    Groups are resampled independently (their sizes are kept), in the order of ``group_names`` (default: sorted),
    each drawing all its resamples at once from one ``numpy.random.default_rng(seed)``:
    ``J_g = rng.integers(0, K_g, size=(n_boot, K_g))``. Same seed, same data: the same intervals.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[:, None] if v.ndim == 1 else v
    n = v.shape[0]
    grp = np.array(["all"] * n if groups is None else [str(g) for g in groups], dtype=object)
    clu = np.array([str(i) for i in range(n)] if clusters is None else [str(c) for c in clusters], dtype=object)
    if len(grp) != n or len(clu) != n:
        raise ValueError(f"values ({n}), groups ({len(grp)}) and clusters ({len(clu)}) differ in length")
    names = list(group_names) if group_names is not None else sorted(set(grp.tolist()))
    rng = np.random.default_rng(seed)
    est = np.full((len(names), v.shape[1]), math.nan)
    samples = np.full((n_boot, len(names), v.shape[1]), math.nan)
    units = np.zeros(len(names), dtype=np.int64)
    for gi, g in enumerate(names):
        sel = grp == g
        ids, inverse = np.unique(clu[sel].astype(str), return_inverse=True)
        k = len(ids)
        units[gi] = k
        if k == 0:
            continue
        sums = np.stack([np.bincount(inverse, weights=v[sel, m], minlength=k) for m in range(v.shape[1])], axis=1)
        counts = np.bincount(inverse, minlength=k).astype(np.float64)
        est[gi] = sums.sum(axis=0) / counts.sum()
        draw = rng.integers(0, k, size=(n_boot, k))
        samples[:, gi, :] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)[:, None]
    return GroupBootstrap(names, est, samples, units, confidence)


def bootstrap_mean_ci(values: Sequence[float], clusters: Sequence[str] | None = None, n_boot: int = N_BOOT,
                      seed: int = BOOT_SEED, confidence: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of the mean of ``values`` over clusters (:func:`bootstrap_group_means`, one group)."""
    return bootstrap_group_means(values, None, clusters, n_boot=n_boot, seed=seed,
                                 confidence=confidence).group_ci("all")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], groups: Sequence[str], clusters: Sequence[str] | None,
                     n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                     confidence: float = 0.95) -> tuple[GroupBootstrap, dict[str, BootstrapCI]]:
    """Paired bootstrap of method A - method B on the same cases (``a[i]``, ``b[i]`` the scores of case i).

    Each resample draws the cases (clusters, within each group) once and scores both methods on them, so the
    differences keep their pairing. Returns the bootstrap and ``{"worst": CI of min_g mean_g(A) - min_g mean_g(B),
    <group>: CI of mean_g(A) - mean_g(B) for each group}``.
    """
    boot = bootstrap_group_means(np.stack([np.asarray(a, float), np.asarray(b, float)], axis=1), groups, clusters,
                                 n_boot=n_boot, seed=seed, confidence=confidence)
    est, s = boot.estimate, boot.samples
    out = {"worst": boot.ci(float(est[:, 0].min() - est[:, 1].min()), s[:, :, 0].min(1) - s[:, :, 1].min(1),
                            int(boot.n_units.sum()))}
    for gi, g in enumerate(boot.groups):
        out[g] = boot.ci(float(est[gi, 0] - est[gi, 1]), s[:, gi, 0] - s[:, gi, 1], int(boot.n_units[gi]))
    return boot, out


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of m p-values (family-wise error rate).

    With the m finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)`` (ties in input order):
    ``p_holm_(i) = min(1, max_{j <= i} (m - j + 1) p_(j))``. NaN stays NaN and does not count in m.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out
