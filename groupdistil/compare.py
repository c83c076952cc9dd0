"""``groupdistil compare``: a grid of runs over methods, seeds and parameter values, and its statistical report.

    groupdistil compare EXPERIMENT.yaml --data-root DIR --out OUT [--debug]

Experiment YAML (relative paths resolve against the current working directory)::

    student_config: configs/waterbirds.yaml         # required: the run config of every student run
    teacher_config: configs/waterbirds_teacher.yaml # the implicit teacher run; required when a method distils
    methods: [erm, kd, groupdro, groupdistil]       # required; 'teacher' is not a method (it always runs)
    seeds: [0, 1, 2]                                # student seeds (default [0])
    teacher_seed: 0                                 # default 0
    set: {train.max_steps: 2000}                    # dotted overrides for every student run (like --set)
    teacher_set: {train.max_steps: 4000}            # dotted overrides for the teacher run
    sweep: {method_args.eta: [0.001, 0.01, 0.1]}    # grid: cartesian product over the keys
    sweep_methods: [groupdistil]                    # methods the sweep applies to (default: all); others once per seed
    pairs: [[groupdistil, kd]]                      # paired comparisons A - B (default [[groupdistil, kd]] if both run)
    data:
      synthesize_if_missing: true                   # write a missing data root with the pipeline's synthesize()
      seed: 0                                       # synthesis seed
      options: {}                                   # fixed synthesize() options
      sweep: {minority_scale: [1.0, 0.25, 0.05]}    # data levels DATA_ROOT/<option>=<value>, each with its own teacher
    metric_note: "..."                              # what the metrics mean (default: the pipeline's metric_note)

``set``/``sweep``/``teacher_set`` keys are checked against the run-config schema; ``seed`` and ``pipeline`` (and
``method`` for students) are set by the experiment. Data-sweep levels are always synthesised when missing (into a
``.partial`` folder renamed on success); a multi-option data sweep is the cartesian product, named
``<a>=<x>__<b>=<y>``.

Layout of OUT (per data level ``OUT/<level>/`` when ``data.sweep`` is given)::

    teacher/                                        # one teacher per data level, shared by all students
    runs/<method>[__<key>=<value>...]__seed=<n>/    # <key>: last part of the dotted sweep key (unless ambiguous)
    runs.csv  comparison.csv  paired_tests.csv  report.md  report.html  plots/*.png

Every run is a ``Trainer`` run folder: a finished one (metrics.json present, same config) is skipped and an
interrupted one resumes, so rerunning the same command continues an interrupted comparison (a finished run whose
settings changed is refused: delete its folder to retrain it). Students record the
teacher by absolute path, so keep OUT where it is to reuse its runs. Statistics: see :mod:`groupdistil.stats`
(std over seeds is the sample std; paired t-test across seeds; Wilcoxon across cases of B's worst group, each case
averaged over the seeds, when the pipeline's ``case_scores`` gives per-case scores).
"""
from __future__ import annotations

import argparse
import copy
import csv
import html
import io
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import (
    check_ranges,
    config_schema,
    deep_merge,
    load_yaml,
    resolve_config,
    select_method_args,
    validate,
)
from .errors import UserError
from .io import atomic_path, atomic_write_text
from .pipeline import Pipeline, get_pipeline, synthesize_data, synthetic_incomplete
from .report import (
    fmt,
    fmt_mean_std,
    html_image,
    html_table,
    md_table,
    write_report_pair,
)
from .rundir import FolderLock
from .stats import PairedTest, mean_std, pair_cases, paired_t, wilcoxon_paired

EXPERIMENT_SCHEMA: dict[str, Any] = {
    "student_config": "", "teacher_config": "", "methods": [], "seeds": [0], "teacher_seed": 0,
    "set": {}, "teacher_set": {}, "sweep": {}, "sweep_methods": [], "pairs": [], "metric_note": "",
    "data": {"synthesize_if_missing": False, "seed": 0, "options": {}, "sweep": {}},
}
_FREE = {("set",), ("teacher_set",), ("sweep",), ("data", "options"), ("data", "sweep")}  # keys not checked
_RESERVED = {"seed", "pipeline", "groups", "run"}  # set by the experiment or by the run itself
WORST, AVERAGE = "worst_group_metric", "average_metric"


def say(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# --- the experiment file ---------------------------------------------------------------------------------------
@dataclass
class Experiment:
    """A validated experiment file (see the module docstring for the keys)."""

    path: Path
    student_config: Path
    teacher_config: Path | None
    methods: list[str]
    seeds: list[int]
    teacher_seed: int
    set: dict[str, Any]
    teacher_set: dict[str, Any]
    sweep: dict[str, list[Any]]
    sweep_methods: list[str]
    pairs: list[tuple[str, str]]
    synthesize_if_missing: bool
    data_seed: int
    data_options: dict[str, Any]
    data_sweep: dict[str, list[Any]]
    metric_note: str


def _check_schema(raw: dict[str, Any], src: str, schema: dict[str, Any] = EXPERIMENT_SCHEMA,
                  prefix: tuple[str, ...] = ()) -> None:
    """Keys and value types of the experiment file (inside free mappings only that they are mappings)."""
    for key, value in raw.items():
        path = (*prefix, key)
        if isinstance(schema.get(key), dict):
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{src}: key '{'.'.join(path)}' must be a mapping, got {value!r}")
            if path not in _FREE and value:
                _check_schema(value, src, schema[key], path)
        else:
            validate({key: value}, schema, src, prefix)


def _names(src: str, key: str, values: Any, valid: Sequence[str], what: str) -> list[str]:
    if not isinstance(values, list) or any(not isinstance(v, str) for v in values):
        raise UserError(f"{src}: key '{key}' must be a list of {what} names, got {values!r}")
    for v in values:
        if v == "teacher":
            raise UserError(f"{src}: key '{key}': 'teacher' is not a method (the teacher run is implicit; configure "
                            f"it with teacher_config, teacher_seed, teacher_set)")
        if v not in valid:
            raise UserError(f"{src}: key '{key}': unknown {what} '{v}'; valid: {', '.join(valid)}")
    if len(set(values)) != len(values):
        raise UserError(f"{src}: key '{key}' lists a {what} twice: {values!r}")
    return list(values)


def _grid(src: str, key: str, mapping: dict[str, Any]) -> dict[str, list[Any]]:
    for k, v in mapping.items():
        if not isinstance(v, list) or not v:
            raise UserError(f"{src}: key '{key}.{k}' must be a non-empty list of values, got {v!r}")
        if len(set(map(repr, v))) != len(v):
            raise UserError(f"{src}: key '{key}.{k}' repeats a value: {v!r}")
    return {str(k): list(v) for k, v in mapping.items()}


def _overrides(src: str, key: str, mapping: dict[str, Any], reserved: set[str]) -> dict[str, Any]:
    for k in mapping:
        if str(k).split(".")[0] in reserved:
            raise UserError(f"{src}: key '{key}.{k}' is set by the experiment, not by overrides "
                            f"(use methods / seeds / teacher_seed)")
    return dict(mapping)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML; errors name the file and the key."""
    from .methods import METHODS

    raw = load_yaml(path)
    src = str(path)
    _check_schema(raw, src)
    e = deep_merge(EXPERIMENT_SCHEMA, raw)
    for key in ("student_config", "methods"):
        if not e[key]:
            raise UserError(f"{src}: missing key '{key}'")
    methods = _names(src, "methods", e["methods"], METHODS.names(), "method")
    sweep_methods = _names(src, "sweep_methods", e["sweep_methods"] or methods, methods, "method of 'methods'")
    default_pairs = [["groupdistil", "kd"]] if {"groupdistil", "kd"} <= set(methods) else []
    pairs_raw = e["pairs"] if "pairs" in raw else default_pairs
    pairs: list[tuple[str, str]] = []
    for pair in pairs_raw:
        ab = _names(src, "pairs", pair, methods, "method of 'methods'")
        if len(ab) != 2:
            raise UserError(f"{src}: key 'pairs': each entry is [A, B] (reported as A - B), got {pair!r}")
        pairs.append((ab[0], ab[1]))
    seeds = e["seeds"]
    if not seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise UserError(f"{src}: key 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    teacher = e["teacher_config"] or None
    if teacher is None and any(METHODS.get(m).needs_teacher for m in methods):
        needy = [m for m in methods if METHODS.get(m).needs_teacher]
        raise UserError(f"{src}: missing key 'teacher_config' (methods {', '.join(needy)} distil a teacher)")
    d = e["data"]
    return Experiment(
        path=Path(path), student_config=Path(e["student_config"]), teacher_config=Path(teacher) if teacher else None,
        methods=methods, seeds=list(seeds), teacher_seed=e["teacher_seed"],
        set=_overrides(src, "set", e["set"] or {}, _RESERVED | {"method"}),
        teacher_set=_overrides(src, "teacher_set", e["teacher_set"] or {}, _RESERVED),
        sweep=_grid(src, "sweep", _overrides(src, "sweep", e["sweep"] or {}, _RESERVED | {"method"})),
        sweep_methods=sweep_methods, pairs=pairs, synthesize_if_missing=d["synthesize_if_missing"],
        data_seed=d["seed"], data_options=dict(d["options"] or {}), data_sweep=_grid(src, "data.sweep", d["sweep"] or {}),
        metric_note=e["metric_note"])


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """``{a: [1, 2], b: [x]}`` -> ``[{a: 1, b: x}, {a: 2, b: x}]`` (cartesian product; ``{}`` -> ``[{}]``)."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 0.1}`` -> ``{"train": {"lr": 0.1}}`` (values kept as they are)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        for part in reversed(str(key).split(".")):
            value = {part: value}
        out = deep_merge(out, value)
    return out


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Dotted key -> its last part, unless two keys share a last part (then the full key)."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def fmt_value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def label(values: dict[str, Any], sep: str = "__") -> str:
    """``{"method_args.eta": 0.01}`` -> ``eta=0.01`` (file-name safe)."""
    short = short_keys(list(values))
    return sep.join(re.sub(r"[^\w.=+-]", "_", f"{short[k]}={fmt_value(v)}") for k, v in values.items())


# --- the plan ----------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One run of the grid (the teacher has method ``teacher``)."""

    method: str
    seed: int
    params: dict[str, Any]  # swept values (dotted key -> value)
    level: dict[str, Any]  # data-sweep values (synth option -> value)
    cfg: dict[str, Any]
    run_dir: Path
    data_root: Path
    teacher_dir: Path | None = None
    result: dict[str, float] = field(default_factory=dict)  # test metrics, filled after training
    groups: list[str] = field(default_factory=list)  # group names in index order, filled after training

    @property
    def variant(self) -> tuple[str, str, str]:
        """(data level, method, swept values): the runs of a variant differ by seed only."""
        return label(self.level), self.method, label(self.params, " ")

    @property
    def title(self) -> str:
        """``groupdistil eta=0.01``: the method and its swept values."""
        return " ".join(filter(None, [self.method, label(self.params, " ")]))


def plan_runs(exp: Experiment, data_root: Path, out: Path, pipeline_cls: type[Pipeline]) -> list[RunSpec]:
    """Every run of the grid, each data level's teacher first, then students seed by seed."""
    from .methods import METHODS

    src = str(exp.path)
    students = {m: resolve_config(exp.student_config, deep_merge(nest(exp.set), {"method": m}), pipeline_cls,
                                  f"{src}: key 'set'", strict_method_args=False) for m in exp.methods}
    variants = expand_grid(exp.sweep)
    schema = config_schema(pipeline_cls)
    for params in variants:
        validate(nest(params), schema, f"{src}: key 'sweep'")
    teacher = None
    if exp.teacher_config is not None:
        teacher = resolve_config(exp.teacher_config, deep_merge(nest(exp.teacher_set), {"seed": exp.teacher_seed}),
                                 pipeline_cls, f"{src}: key 'teacher_set'")
    specs: list[RunSpec] = []
    for level in expand_grid(exp.data_sweep):
        root, lout = (data_root / label(level), out / label(level)) if level else (data_root, out)
        tdir = lout / "teacher" if teacher is not None else None
        if teacher is not None:
            specs.append(RunSpec("teacher", exp.teacher_seed, {}, level, copy.deepcopy(teacher), tdir, root))
        for seed in exp.seeds:
            for method in exp.methods:
                needs = METHODS.get(method).needs_teacher
                for params in variants if method in exp.sweep_methods else [{}]:
                    cfg = deep_merge(students[method], {"seed": seed, **nest(params)})
                    select_method_args(cfg, nest(params).get("method_args") or {}, f"{src}: key 'sweep'")
                    check_ranges(cfg, f"{src}: key 'sweep'")
                    name = "__".join(filter(None, [method, label(params), f"seed={seed}"]))
                    specs.append(RunSpec(method, seed, params, level, cfg, lout / "runs" / name, root,
                                         tdir if needs else None))
    return specs


# --- running -----------------------------------------------------------------------------------------------------
def prepare_data(exp: Experiment, root: Path, level: dict[str, Any], pipeline_cls: type[Pipeline]) -> None:
    """Synthesise a missing data root (always for a data-sweep level); an interrupted synthesis is redone."""
    if root.exists() and not synthetic_incomplete(root):
        return
    if not (level or exp.synthesize_if_missing):
        raise UserError(f"{root}: data root does not exist (set data.synthesize_if_missing: true in {exp.path}, "
                        f"or make one with 'groupdistil synth {pipeline_cls.name} --out {root}')")
    options = {**exp.data_options, **level}
    say(f"synthesising {pipeline_cls.name} data into {root} (seed {exp.data_seed}, options {options})")
    synthesize_data(pipeline_cls, root, exp.data_seed, options, force=True, source=f"{exp.path}: data option")


def train_all(exp: Experiment, specs: list[RunSpec], pipeline_cls: type[Pipeline], out: Path) -> None:
    """Train (or skip, or resume) every run in order, one progress line per run."""
    from .trainer import Trainer

    t_all = time.time()
    ready: set[Path] = set()
    for i, spec in enumerate(specs, 1):
        if spec.data_root not in ready:
            prepare_data(exp, spec.data_root, spec.level, pipeline_cls)
            ready.add(spec.data_root)
        tag = f"[{i}/{len(specs)}] {spec.run_dir.relative_to(out)}"
        if not (spec.run_dir / "metrics.json").exists():
            say(f"{tag}: started")
        t0 = time.time()
        teacher = str(spec.teacher_dir) if spec.teacher_dir is not None else None
        try:
            metrics = Trainer(copy.deepcopy(spec.cfg), pipeline_cls, spec.data_root, spec.run_dir, teacher).run()
        except UserError as e:
            raise UserError(f"{tag}: {e} (in a comparison: delete that run folder to retrain it)") from None
        if metrics is None:
            say(f"{tag}: skipped (finished earlier)")
        else:
            say(f"{tag}: finished in {time.time() - t0:.1f}s (test worst-group {metrics['test'][WORST]:.4f}); "
                f"{time.time() - t_all:.0f}s elapsed")
    say(f"all {len(specs)} runs finished ({time.time() - t_all:.0f}s)")


def read_results(specs: list[RunSpec]) -> list[str]:
    """Fill each spec's ``result`` with its test metrics (flat: worst, average, ``group.<name>``); the group names."""
    groups: list[str] = []
    for spec in specs:
        m = json.loads((spec.run_dir / "metrics.json").read_text())
        test = m["test"]
        spec.result = {WORST: float(test[WORST]), AVERAGE: float(test[AVERAGE]),
                       **{f"group.{g}": float(v) for g, v in test["group_metric"].items()}}
        spec.groups = list(m.get("groups") or test["group_metric"])
        groups += [g for g in spec.groups if g not in groups]
    return groups


# --- summaries and tests -----------------------------------------------------------------------------------------
def by_variant(specs: list[RunSpec]) -> dict[tuple[str, str, str], list[RunSpec]]:
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

    @property
    def title(self) -> str:
        return f"{self.a.title} − {self.b.title}"


def nice_metric(metric: str, worst_of: str = "") -> str:
    """Report header of a metric column: ``worst group``, ``average``, a group name (per-case: whose worst group)."""
    if metric.startswith("group."):
        g = metric[len("group."):]
        return f"cases of {g} (worst group of {worst_of})" if worst_of else g
    return {WORST: "worst group", AVERAGE: "average"}.get(metric, metric)


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
    scores = [(pipeline_cls.case_scores(a.run_dir), pipeline_cls.case_scores(b.run_dir)) for a, b in pairs]
    if all(sa is not None and sb is not None for sa, sb in scores):
        _, xa, xb = pair_cases([sa for sa, _ in scores], [sb for _, sb in scores], worst)
        rows.append(PairRow(lv, a0, b0, f"group.{worst}", wilcoxon_paired(xa, xb)))
    return rows


# --- outputs -----------------------------------------------------------------------------------------------------
def write_csv(path: Path, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(headers)
    w.writerows(["" if v is None or (isinstance(v, float) and math.isnan(v)) else v for v in r] for r in rows)
    atomic_write_text(path, buf.getvalue())


class Doc:
    """Builds the Markdown and the HTML report side by side from the same calls."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text)
        self.html.append(f"<p class='note'>{html.escape(text)}</p>")

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.md.append(md_table(headers, rows))
        self.html.append(html_table(headers, rows))

    def image(self, png: Path, rel: str, alt: str) -> None:
        self.md.append(f"![{alt}]({rel})")
        self.html.append(html_image(png, alt))


class Writer:
    """Writes runs.csv, comparison.csv, paired_tests.csv, plots and report.{md,html} of a finished grid."""

    def __init__(self, exp: Experiment, pipeline_cls: type[Pipeline], specs: list[RunSpec], groups: list[str],
                 out: Path) -> None:
        self.exp, self.pipeline_cls, self.specs, self.out = exp, pipeline_cls, specs, out
        self.metrics = [WORST, AVERAGE, *[f"group.{g}" for g in groups]]
        self.level_keys, self.sweep_keys = list(exp.data_sweep), list(exp.sweep)

    def keys_of(self, s: RunSpec) -> list[Any]:
        return [s.level.get(k) for k in self.level_keys] + [s.params.get(k) for k in self.sweep_keys]

    def write(self) -> Path:
        variants = by_variant(self.specs)
        pairs = paired_comparisons(self.exp, self.specs, self.pipeline_cls)
        write_csv(self.out / "runs.csv", ["method", "seed", *self.level_keys, *self.sweep_keys, *self.metrics, "run_dir"],
                  [[s.method, s.seed, *self.keys_of(s), *[s.result.get(m) for m in self.metrics],
                    s.run_dir.relative_to(self.out).as_posix()] for s in self.specs])
        write_csv(self.out / "comparison.csv",
                  ["method", *self.level_keys, *self.sweep_keys, "n_seeds",
                   *[f"{m}_{x}" for m in self.metrics for x in ("mean", "std")]],
                  [[runs[0].method, *self.keys_of(runs[0]), len(runs),
                    *[v for m in self.metrics for v in self._ms(runs, m)]] for runs in variants.values()])
        write_csv(self.out / "paired_tests.csv",
                  [*self.level_keys, "a", "b", "metric", "test", "n", "mean_diff", "median_diff", "ci95_low",
                   "ci95_high", "statistic", "p"],
                  [[*[r.level.get(k) for k in self.level_keys], r.a.title, r.b.title, r.metric, *self._test_cells(r.test)] for r in pairs])
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
        student = next((s.cfg for s in self.specs if s.method != "teacher"), self.specs[0].cfg)
        return (self.exp.metric_note or self.pipeline_cls.metric_note(student)
                or f"Worst-group and average metric as defined by the {name} pipeline's evaluation.")

    def report(self, variants: dict[tuple[str, str, str], list[RunSpec]], pairs: list[PairRow]) -> None:
        doc = Doc()
        e = self.exp
        doc.para(f"Pipeline {self.pipeline_cls.name}; experiment {e.path}; methods {', '.join(e.methods)} "
                 f"(plus the teacher); seeds {e.seeds}; test split, model selected by worst-group validation metric.")
        doc.para(self.metric_note())
        doc.para("Mean ± sample std (ddof 1) over seeds. Paired tests: A − B paired by seed (t-test, mean difference "
                 "and 95% CI; 'n/a' with fewer than 2 pairs); Wilcoxon signed-rank over the test cases of B's worst "
                 "group, each case's score averaged over the common seeds (when the pipeline has per-case scores).")
        levels = list(dict.fromkeys(k[0] for k in variants))
        for lv in levels:
            if lv:
                doc.heading(f"Data level {lv}")
            self._level_tables(doc, [runs for k, runs in variants.items() if k[0] == lv],
                               [p for p in pairs if label(p.level) == lv], lv)
        self._plots(doc, variants, levels)
        doc.para("Per-run values: runs.csv; summary: comparison.csv; tests: paired_tests.csv.")
        title = f"Comparison: {e.path.stem}"
        write_report_pair(self.out, title, "\n\n".join(doc.md), "\n".join(doc.html))

    def _level_tables(self, doc: Doc, variants: list[list[RunSpec]], pairs: list[PairRow], lv: str) -> None:
        lvl = 3 if lv else 2
        doc.heading("Test metrics (mean ± std over seeds)", lvl)
        doc.table(["method", "n", *[nice_metric(m) for m in self.metrics]],
                  [[runs[0].title, len(runs),
                    *[fmt_mean_std(*self._ms(runs, m)) for m in self.metrics]] for runs in variants])
        if pairs:
            doc.heading("Paired comparisons", lvl)
            doc.table(["comparison", "metric", "test", "n", "mean diff", "95% CI", "statistic", "p"],
                      [[p.title, nice_metric(p.metric, p.b.method), *self._test_text(p.test)] for p in pairs])

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
            specs = [r for r in self.specs if label(r.level) == lv]
            for key, short in short_keys(self.sweep_keys).items():
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
            doc.image(png, png.relative_to(self.out).as_posix(), alt)

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


def _save(fig: Any, png: Path) -> None:
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_group_weights(png: Path, variants: dict[tuple[str, str, str], list[RunSpec]], title: str) -> None:
    """One panel per method variant: each group's weight over steps, averaged over the seeds."""
    fig, axes = _figure(len(variants), min(3, len(variants)))
    for ax, runs in zip(axes, variants.values()):
        read = [read_group_weights(r.run_dir) for r in runs]
        logs = [lg for lg, _ in read]
        seen = set().union(*(sn for _, sn in read))
        steps = sorted(set.intersection(*(set(lg) for lg in logs)))
        groups = runs[0].groups
        name = lambda g: groups[g] if g < len(groups) else f"group {g}"  # noqa: E731
        n_groups = len(logs[0][steps[0]]) if steps else 0
        # groups that never appear in training (e.g. M&Ms vendors C and D) keep a weight that only shrinks by
        # renormalisation; drawing it would squash the curves that matter, so the panel names them instead
        unseen = [g for g in range(n_groups) if g not in seen]
        for g in range(n_groups):
            if g in seen:
                ax.plot(steps, [sum(lg[s][g] for lg in logs) / len(logs) for s in steps], label=name(g))
        note = f"\nnot shown: {', '.join(name(g) for g in unseen)} (no training samples)" if unseen else ""
        ax.set_title(f"{runs[0].title} (mean of {len(runs)} seeds){note}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("group weight q_g")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    _save(fig, png)


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
    _save(fig, png)


# --- entry points ------------------------------------------------------------------------------------------------
def run_comparison(experiment: str | Path, data_root: str | Path, out: str | Path,
                   pipeline_cls: type[Pipeline] | None = None) -> Path:
    """Plan, train (skipping finished runs), and report a comparison; returns the report.html path.

    ``pipeline_cls`` defaults to the student config's ``pipeline`` looked up with ``get_pipeline`` (tests inject one).
    """
    exp = load_experiment(experiment)
    if pipeline_cls is None:
        pipeline_cls = get_pipeline(str(load_yaml(exp.student_config).get("pipeline")))
    out = Path(out).resolve()
    specs = plan_runs(exp, Path(data_root).resolve(), out, pipeline_cls)
    with FolderLock(out, "comparison"):
        train_all(exp, specs, pipeline_cls, out)
        groups = read_results(specs)
        path = Writer(exp, pipeline_cls, specs, groups, out).write()
    say(f"report: {path}")
    return path


def cmd_compare(args: argparse.Namespace) -> int:
    run_comparison(args.experiment, args.data_root, args.out)
    return 0


def add_parser(sub: Any) -> None:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    c = sub.add_parser("compare", help="run a grid of methods x seeds (x parameter values) and a statistical report")
    c.add_argument("experiment", help="experiment YAML (see 'groupdistil.compare' docs for the keys)")
    c.add_argument("--data-root", required=True, help="dataset folder (or the parent of data-sweep levels)")
    c.add_argument("--out", required=True, help="comparison folder (rerun the same command to continue)")
    c.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    c.set_defaults(func=cmd_compare)
