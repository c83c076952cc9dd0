"""The outputs of a finished comparison: ``runs.csv``, ``comparison.csv``, ``paired_tests.csv``, the report
(``report.md``, ``report.html``) and its plots (``plots/*.png``).

- ``runs.csv``: one row per run (the teacher included): method, seed, data-sweep and sweep values, the test metrics
  (worst group, average, each group), the run folder relative to OUT;
- ``comparison.csv``: one row per variant: the number of seeds and each metric's mean and sample std over them;
- ``paired_tests.csv``: one row per paired test or bootstrap interval (:mod:`groupdistil.experiments.summary`); empty
  cells for values a test does not give, ``n/a`` as the test when there are fewer than 2 seed pairs; ``p_holm``: the
  p-value Holm-adjusted over every test of the experiment file.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from ..io import atomic_write_text
from ..pipeline import GroupBreakdown, Pipeline
from ..report import Doc, fmt, fmt_mean_std, save_figure
from ..stats import BOOT_SEED, N_BOOT, PairedTest, mean_std
from .plan import RunSpec, expand_grid, fmt_value, label, short_keys
from .schema import Experiment
from .summary import AVERAGE, VAL_AVERAGE, VAL_WORST, WORST, PairRow, by_variant, paired_comparisons


def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A CSV file, written atomically; None and NaN as empty cells."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in r] for r in rows)
    atomic_write_text(path, buf.getvalue())


#: marks the worst group of a method in the table per structure and group
WORST_MARK = "▼"


def nice_metric(metric: str, worst_of: str = "", unit: str = "cases") -> str:
    """Report header of a metric column: ``worst group``, ``average``, a group name (per-case: the ``unit`` of whose
    worst group)."""
    if metric.startswith("group."):
        g = metric[len("group."):]
        return f"{unit} of {g}, the worst group of {worst_of}" if worst_of else g
    return {WORST: "worst group", AVERAGE: "average"}.get(metric, metric)


class Writer:
    """Writes runs.csv, comparison.csv, paired_tests.csv, plots and report.{md,html} of a finished grid."""

    def __init__(self, exp: Experiment, pipeline_cls: type[Pipeline], specs: list[RunSpec], groups: list[str],
                 out: Path) -> None:
        self.exp, self.pipeline_cls, self.specs, self.out = exp, pipeline_cls, specs, out
        self.hooks = pipeline_cls.comparison
        self.metrics = [WORST, AVERAGE, *[f"group.{g}" for g in groups]]
        self.level_keys = list(exp.data_sweep)
        self.sweep_keys = list(exp.sweep) + (["teacher"] if exp.teacher_methods else [])

    def keys_of(self, s: RunSpec) -> list[Any]:
        return [s.level.get(k) for k in self.level_keys] + [s.params.get(k) for k in self.sweep_keys]

    def write(self) -> Path:
        """Write every output; returns the path of report.html."""
        variants = by_variant(self.specs)
        pairs = paired_comparisons(self.exp, self.specs, self.pipeline_cls)
        keys = [*self.level_keys, *self.sweep_keys]
        cols = [*self.metrics, VAL_WORST, VAL_AVERAGE]
        write_csv(self.out / "runs.csv", ["method", "seed", *keys, *cols, "run_dir"],
                  [[s.method, s.seed, *self.keys_of(s), *[s.result.get(m) for m in cols],
                    s.run_dir.relative_to(self.out).as_posix()] for s in self.specs])
        write_csv(self.out / "comparison.csv",
                  ["method", *keys, "n_seeds", *[f"{m}_{x}" for m in cols for x in ("mean", "std")]],
                  [[runs[0].method, *self.keys_of(runs[0]), len(runs),
                    *[v for m in cols for v in self._ms(runs, m)]] for runs in variants.values()])
        write_csv(self.out / "paired_tests.csv",
                  [*self.level_keys, "a", "b", "metric", "test", "n", "mean_diff", "median_diff", "ci95_low",
                   "ci95_high", "statistic", "p", "p_holm"],
                  [[*[r.level.get(k) for k in self.level_keys], r.a.title, r.b.title, r.metric,
                    *self._test_cells(r.test), r.p_holm] for r in pairs])
        self.report(variants, pairs)
        return self.out / "report.html"

    @staticmethod
    def _ms(runs: list[RunSpec], metric: str) -> tuple[float, float]:
        ms = mean_std([r.result[metric] for r in runs if metric in r.result])
        return ms.mean, ms.std

    @staticmethod
    def _test_cells(t: PairedTest | None) -> list[Any]:
        if t is None:
            return ["n/a", 0, None, None, None, None, None, None]
        return [t.test, t.n, t.mean_diff, t.median_diff, t.ci_low, t.ci_high, t.statistic, t.p]

    # --- report --------------------------------------------------------------------------------------------------
    def metric_note(self) -> str:
        name = self.pipeline_cls.name
        return (self.exp.metric_note or self.hooks.metric_note(self.student_cfg())
                or f"Worst-group and average metric as defined by the {name} pipeline's evaluation.")

    def report(self, variants: dict[tuple[str, str, str], list[RunSpec]], pairs: list[PairRow]) -> None:
        doc = Doc()
        e = self.exp
        doc.para(f"Pipeline {self.pipeline_cls.name}; experiment {e.path}; methods {', '.join(e.methods)} "
                 f"(plus the teacher); seeds {e.seeds}; test split; each run's model selected on its validation split.",
                 note=True)
        doc.para(self.metric_note(), note=True)
        unit = self.hooks.case_unit
        doc.para("Mean ± sample std (ddof 1) over seeds. A comparison 'first − second' (two methods) is paired by seed "
                 "(t-test, mean difference and 95% CI; 'n/a' with fewer than 2 pairs), and by test case with the "
                 f"Wilcoxon signed-rank test over the {unit} of the second method's worst group, each one's score "
                 "averaged over the common seeds (when the pipeline has per-case scores). n = seeds for the t-test, "
                 f"n = {unit} for the Wilcoxon test and the bootstrap{UNIT_NOTES.get(unit, '')}.",
                 note=True)
        doc.para(ci_note(unit), note=True)
        levels = list(dict.fromkeys(k[0] for k in variants))
        for lv in levels:
            if lv:
                doc.heading(f"Data level {lv}")
            self._level_tables(doc, [runs for k, runs in variants.items() if k[0] == lv],
                               [p for p in pairs if label(p.level) == lv], lv)
        self._plots(doc, variants, levels)
        doc.para("Per-run values: runs.csv; summary: comparison.csv; tests: paired_tests.csv.", note=True)
        title = f"Comparison: {e.path.stem}"
        doc.write(self.out, title)

    def group_title(self, group: str) -> str:
        """A group as the pipeline shows it (``A (Siemens)``), under the students' config."""
        return self.hooks.group_label(group, self.student_cfg())

    def student_cfg(self) -> dict[str, Any]:
        return next((s.cfg for s in self.specs if s.method != "teacher"), self.specs[0].cfg)

    def _level_tables(self, doc: Doc, variants: list[list[RunSpec]], pairs: list[PairRow], lv: str) -> None:
        lvl = 3 if lv else 2
        doc.heading("Test metrics (mean ± std over seeds)", lvl)
        doc.table(["method", "n", *[self.group_title(m[len("group."):]) if m.startswith("group.") else nice_metric(m)
                                    for m in self.metrics]],
                  [[runs[0].title, len(runs),
                    *[fmt_mean_std(*self._ms(runs, m)) for m in self.metrics]] for runs in variants])
        self._breakdown_table(doc, variants, lvl)
        doc.heading("Validation metrics of the selected checkpoints (choose settings on these, not on test)", lvl)
        doc.table(["method", "n", "worst group (val)", "average (val)"],
                  [[runs[0].title, len(runs), *[fmt_mean_std(*self._ms(runs, m)) for m in (VAL_WORST, VAL_AVERAGE)]]
                   for runs in variants])
        if pairs:
            doc.heading("Paired comparisons", lvl)
            doc.table(["comparison", "metric", "test", "n", "mean diff", "95% CI", "statistic", "p", "p (Holm)"],
                      [[p.title, nice_metric(self._labelled(p.metric), p.b.method, self.hooks.case_unit),
                        *self._test_text(p.test),
                        "n/a" if math.isnan(p.p_holm) else f"{p.p_holm:.3g}"] for p in pairs])

    def _labelled(self, metric: str) -> str:
        return f"group.{self.group_title(metric[len('group.'):])}" if metric.startswith("group.") else metric

    def _breakdown_table(self, doc: Doc, variants: list[list[RunSpec]], lvl: int) -> None:
        """Per structure and group (:meth:`ComparisonHooks.group_breakdown`): each run's group mean, mean ± std over the
        seeds; the worst group of each method in each column marked (lowest mean where higher is better, else
        highest). Nothing for a pipeline without structures."""
        rows: list[list[Any]] = []
        first: GroupBreakdown | None = None
        for runs in variants:
            parts = [self.hooks.group_breakdown(r.run_dir) for r in runs]
            if not parts or any(b is None for b in parts):
                return
            first = first or parts[0]
            groups = list(parts[0].values)
            stats = {(g, c): mean_std([b.values.get(g, {}).get(c, math.nan) for b in parts
                                       if not math.isnan(b.values.get(g, {}).get(c, math.nan))])
                     for g in groups for c in parts[0].columns}
            worst = {}
            for c, higher in zip(parts[0].columns, parts[0].higher_is_better):
                means = [(g, stats[(g, c)].mean) for g in groups if not math.isnan(stats[(g, c)].mean)]
                if means:
                    worst[c] = (min if higher else max)(means, key=lambda gm: gm[1])[0]
            for g in groups:
                rows.append([runs[0].title, self.group_title(g), parts[0].n.get(g, 0),
                             *[fmt_mean_std(stats[(g, c)].mean, stats[(g, c)].std, d)
                               + (f" {WORST_MARK}" if worst.get(c) == g else "")
                               for c, d in zip(parts[0].columns, parts[0].digits)]])
        if first is None:
            return
        unit = self.hooks.case_unit
        doc.heading(f"Test per {first.grouping} and structure (mean ± std over seeds)", lvl)
        doc.table(["method", first.grouping, f"n ({unit})", *first.columns], rows)
        doc.para(f"{WORST_MARK}: the worst {first.grouping} of that method in that column (lowest mean Dice, highest "
                 f"mean distance). Each run's {first.grouping} mean, then mean ± std over the seeds; n: test {unit} "
                 f"of the {first.grouping}. {first.note}", note=True)

    @staticmethod
    def _test_text(t: PairedTest | None) -> list[str]:
        if t is None:
            return ["paired t (seeds)", "< 2", "n/a", "n/a", "n/a", "n/a"]
        ci = "n/a" if math.isnan(t.ci_low) else f"[{t.ci_low:+.4f}, {t.ci_high:+.4f}]"
        p = "n/a" if math.isnan(t.p) else f"{t.p:.3g}"
        return [t.test, str(t.n), f"{t.mean_diff:+.4f}", ci, fmt(t.statistic), p]

    def _plots(self, doc: Doc, variants: dict[tuple[str, str, str], list[RunSpec]], levels: list[str]) -> None:
        made: list[tuple[Path, str]] = []
        for lv in levels:
            suffix = f"__{lv}" if lv else ""
            weighted = {k: runs for k, runs in variants.items()
                        if k[0] == lv and read_group_weights(runs[0].run_dir)[0]}
            if weighted:
                png = self.out / "plots" / f"group_weights{suffix}.png"
                plot_group_weights(png, weighted, f"Group weights over training {lv}".strip())
                made.append((png, "group weights"))
            scored = {k: [r for r in runs if WORST in r.result and AVERAGE in r.result]
                      for k, runs in variants.items() if k[0] == lv}
            scored = {k: runs for k, runs in scored.items() if runs}
            if len(scored) > 1:
                png = self.out / "plots" / f"worst_vs_average{suffix}.png"
                plot_worst_vs_average(png, scored, f"Worst group vs average (test) {lv}".strip())
                made.append((png, "worst-group vs average"))
            specs = [r for r in self.specs if label(r.level) == lv]
            for key, short in short_keys(list(self.exp.sweep)).items():
                png = self.out / "plots" / f"worst_vs_{short}{suffix}.png"
                self._plot_vs(png, specs, key, [fmt_value(v) for v in self.exp.sweep[key]],
                              lambda s, k=key: fmt_value(s.params[k]) if k in s.params else None,
                              lambda s, k=key: " ".join(filter(None, [s.method, label(
                                  {p: v for p, v in s.params.items() if p != k}, " ")])),
                              f"Worst-group metric vs {key} {lv}".strip())
                made.append((png, f"worst-group vs {key}"))
        if self.level_keys:
            png = self.out / "plots" / "worst_vs_data_level.png"
            self._plot_vs(png, self.specs, "data level", [label(lv) for lv in expand_grid(self.exp.data_sweep)],
                          lambda s: label(s.level), lambda s: s.title, "Worst-group metric vs data level (imbalance)")
            made.append((png, "worst-group vs data level"))
        if made:
            doc.heading("Plots")
        for png, alt in made:
            doc.image(png, alt, png.relative_to(self.out).as_posix())
            if alt == "group weights":
                doc.para(WEIGHTS_NOTE, note=True)

    def _plot_vs(self, png: Path, specs: list[RunSpec], xlabel: str, xs: list[str],
                 x_of: Callable[[RunSpec], str | None], name_of: Callable[[RunSpec], str], title: str) -> None:
        """Worst-group mean ± std at each x; one line per ``name_of``; a run without an x value is a constant."""
        series: dict[str, list[tuple[float, float] | None]] = {}
        constant: set[str] = set()
        for runs in by_variant(specs).values():
            x, name = x_of(runs[0]), name_of(runs[0])
            line = series.setdefault(name, [None] * len(xs))
            ms = mean_std([r.result[WORST] for r in runs])
            if x is None:
                line[:] = [(ms.mean, ms.std)] * len(xs)
                constant.add(name)
            else:
                line[xs.index(x)] = (ms.mean, ms.std)
        plot_lines(png, title, xlabel, xs, series, constant)


#: how a pipeline's per-case unit comes about, when it is not one file per case
UNIT_NOTES = {"subjects": " (one score per subject: the mean over its ED and ES volumes, which are not independent)"}


def ci_note(unit: str = "cases") -> str:
    """The explanation of the paired bootstrap rows, resampling ``unit``."""
    return (
        f"Paired bootstrap ({unit}): first − second method on the same test {unit}, each one's score averaged over "
        f"the common seeds; {N_BOOT} resamples (seed {BOOT_SEED}) of the {unit} within each group, 95% percentile "
        "interval. For 'worst group' the statistic is the lowest group mean of the first method minus that of the "
        f"second (the worst group may change between resamples); for the {unit} of the second method's worst group, "
        f"the mean difference on them. It says how much the result could move with other test {unit} of the same "
        "kind, not with other seeds (the t-test does). An interval that excludes 0 is evidence of a difference on "
        "these cases. p (Holm): each p-value adjusted for all the tests of this experiment file (Holm's step-down "
        "method); judge significance on it, not on the raw p.")


def read_group_weights(run_dir: Path) -> tuple[dict[int, list[float]], set[int]]:
    """``{step: [q_g ...]}`` from a run's train_log.jsonl ({} when the method logs no group weights), and the
    groups that had samples in some logged batch."""
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return {}, set()
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    seen = {g for r in rows for g, n in enumerate(r.get("group_count", [])) if n > 0}
    return {r["step"]: r["group_weight"] for r in rows if "group_weight" in r}, seen


def _figure(n: int = 1, ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


WEIGHTS_NOTE = (
    "How to read the group weights: at every step exponentiated-gradient ascent multiplies each trained group's "
    "weight by exp(eta x its loss in the batch) and renormalises, so a group's weight grows while its training loss "
    "is above the others'. Groups without training samples have weight 0 throughout (not drawn). A majority group "
    "ending above the minority means the minority's training loss was lower: its few cases were fitted "
    "(memorised) sooner, which is the failure the group DRO paper warns about, not evidence that the minority is "
    "served well; its test metric above says how it was served.")


def plot_group_weights(png: Path, variants: dict[tuple[str, str, str], list[RunSpec]], title: str) -> None:
    """One panel per method variant: each group's weight over steps, averaged over the seeds."""
    fig, axes = _figure(len(variants), min(3, len(variants)))
    for ax, runs in zip(axes, variants.values()):
        read = [read_group_weights(r.run_dir) for r in runs]
        logs = [lg for lg, _ in read]
        seen = set().union(*(sn for _, sn in read))
        steps = sorted(set.intersection(*(set(lg) for lg in logs)))
        n_groups = len(logs[0][steps[0]]) if steps else 0
        name = [runs[0].groups[g] if g < len(runs[0].groups) else f"group {g}" for g in range(n_groups)]
        # groups that never appear in training (e.g. M&Ms vendors C and D) have weight 0 throughout; the panel names
        # them instead of drawing a flat line at 0
        unseen = [g for g in range(n_groups) if g not in seen]
        for g in range(n_groups):
            if g in seen:
                ax.plot(steps, [sum(lg[s][g] for lg in logs) / len(logs) for s in steps], label=name[g])
        note = f"\nnot shown: {', '.join(name[g] for g in unseen)} (no training samples: weight 0)" if unseen else ""
        ax.set_title(f"{runs[0].title} (mean of {len(runs)} seeds){note}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("group weight q_g")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, png)


def plot_worst_vs_average(png: Path, variants: dict[tuple[str, str, str], list[RunSpec]], title: str) -> None:
    """One point per method variant: its average metric (x) against its worst-group metric (y) on the test split,
    means over the seeds with ± std bars; up and to the right is better on both."""
    fig, (ax,) = _figure()
    for runs in variants.values():
        w, a = mean_std([r.result[WORST] for r in runs]), mean_std([r.result[AVERAGE] for r in runs])
        ax.errorbar([a.mean], [w.mean], yerr=[0.0 if math.isnan(w.std) else w.std],
                    xerr=[0.0 if math.isnan(a.std) else a.std], marker="o", capsize=3,
                    label=f"{runs[0].title} (n={len(runs)})")
    ax.set_xlabel("average metric (test)")
    ax.set_ylabel("worst-group metric (test)")
    ax.set_title(title, fontsize=10)
    # beside the axes, not over them: the variants often crowd into one corner (e.g. every KD variant at 0 worst group)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.set_figwidth(fig.get_figwidth() + 2.2)
    save_figure(fig, png)


def plot_lines(png: Path, title: str, xlabel: str, xs: list[str], series: dict[str, list[tuple[float, float] | None]],
               constant: set[str] = frozenset()) -> None:
    """Categorical x, one line (mean ± std error bars) per series; ``constant`` series dashed, without bars.

    Series are shifted by a small x offset each so that equal values stay visible.
    """
    fig, (ax,) = _figure()
    varying = [n for n in series if n not in constant]
    for name, points in series.items():
        pos = [i for i, p in enumerate(points) if p is not None]
        mean = [points[i][0] for i in pos]
        if name in constant:
            ax.plot(pos, mean, linestyle="--", label=f"{name} (not swept)")
            continue
        shift = 0.04 * (varying.index(name) - (len(varying) - 1) / 2)
        ax.errorbar([i + shift for i in pos], mean, [0.0 if math.isnan(points[i][1]) else points[i][1] for i in pos],
                    marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(xs)), xs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("worst-group metric (test)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, png)
