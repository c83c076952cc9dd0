"""M&Ms-1 report (``report.md`` + ``report.html``).

Inputs in the run folder besides ``metrics`` and ``info``:

- ``per_case.csv`` (:func:`mms_pipeline.metrics.write_per_case_csv`, written by the final test evaluation): box
  plots and per-phase tables;
- ``examples.npz`` (:mod:`mms_pipeline.examples`): the best and the worst case per group, as one slice each.

Every section of the report is per the run's grouping (``info["group_by"]``, else inferred from the group names):
headline, tables, intervals, box plots, examples; the other grouping is folded.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from groupdistil.report import Doc, fmt, fmt_mean_std, save_figure, timing_note
from groupdistil.stats import BOOT_SEED, N_BOOT, GroupBootstrap, bootstrap_group_means

from .examples import EXAMPLES_FILE, EXAMPLES_PNG, examples_figure, load_examples
from .metrics import CLINICAL_INDICES, EMPTY_DISTANCE, MEAN_DICE, STRUCTURES, mean_dice, read_per_case_csv, summarise
from .splits import group_name

PER_CASE_FILE = "per_case.csv"
BOXPLOT_FILE = "report_dice_boxplot.png"
EMPTY_NOTE = (
    f"Empty predictions are scored as in the challenge: a structure missing from the prediction (or from the ground "
    f"truth) gets Dice = Jaccard = 0 and Hausdorff = HD95 = ASSD = {EMPTY_DISTANCE:g}; those -1 entries are excluded "
    f"from the distance means and counted as 'excluded'. A structure absent from both gets Dice = 1 and distance 0."
)


# --- figures ------------------------------------------------------------------------------------------------------
def _subject(row: Mapping[str, Any]) -> str:
    """The subject of a per-case row (``Code``, else ``Name``)."""
    return str(row.get("Code") or row["Name"])


def _sorted_groups(rows: Sequence[Mapping[str, Any]], key: str) -> list[str]:
    return sorted({str(r[key]) for r in rows}, key=lambda g: (len(g), g))


def dice_boxplot(rows: Sequence[Mapping[str, Any]], path: Path, key: str = "Vendor") -> Path:
    """One PNG: a panel per structure, a box of per-volume Dice per group (the per-case column ``key``: ``Vendor``
    or ``Centre``; ED and ES side by side, each box over the group's subjects)."""
    vendors = _sorted_groups(rows, key)
    phases = sorted({str(r.get("ED/ES", "")) for r in rows})
    fig = Figure(figsize=(4.2 * len(STRUCTURES), 3.6))
    width = 0.8 / len(phases)
    for k, s in enumerate(STRUCTURES):
        ax = fig.add_subplot(1, len(STRUCTURES), k + 1)
        for j, ph in enumerate(phases):
            data = [[d for r in rows if str(r[key]) == v and str(r.get("ED/ES", "")) == ph
                     and not math.isnan(d := float(r[f"Dice {s}"]))] for v in vendors]
            pos = np.arange(len(vendors)) + (j - (len(phases) - 1) / 2) * width
            keep = [i for i, d in enumerate(data) if d]
            bp = ax.boxplot([data[i] for i in keep], positions=pos[keep], widths=width * 0.9, patch_artist=True)
            for box in bp["boxes"]:
                box.set_facecolor(f"C{j}")
                box.set_alpha(0.6)
            if ph:
                ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=ph)
        subjects = [len({_subject(r) for r in rows if str(r[key]) == v}) for v in vendors]
        ticks = [f"{group_name(v, key).replace(' (', chr(10) + '(', 1)}\n{c} subj." for v, c in zip(vendors, subjects)]
        ax.set_xticks(np.arange(len(vendors)), ticks, fontsize=7)
        ax.set_xlabel(key.lower())
        ax.set_title(f"Dice {s}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
        if k == 0 and any(phases):
            ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path, dpi=90, bbox_inches="tight")


# --- tables -------------------------------------------------------------------------------------------------------
def _cell(group: Mapping[str, Any], metric: str, digits: int, show_excluded: bool = False) -> str:
    """``mean ± std`` of ``metric`` in one group's statistics; signed errors add the mean absolute error."""
    stats = group.get(metric)
    if not stats or stats.get("mean") is None:
        return "-"
    text = fmt_mean_std(stats["mean"], stats.get("std"), digits)
    if metric.endswith(" err") and group.get(_abs(metric), {}).get("mean") is not None:
        text += f" (MAE {fmt(group[_abs(metric)]['mean'], digits)})"
    return f"{text} ({stats['n_excluded']} excl.)" if show_excluded and stats.get("n_excluded") else text


def _abs(metric: str) -> str:
    """``"LV EF err"`` -> ``"LV EF abs err"`` (derived by :func:`mms_pipeline.metrics.summarise`)."""
    return metric[: -len(" err")] + " abs err" if metric.endswith(" err") else metric


def _groups(summary: Mapping[str, Any]) -> list[str]:
    return [g for g in summary if g != "worst"]


def _group_table(summary: Mapping[str, Any], columns: Sequence[tuple[str, str, int]], group_label: str,
                 extra: Mapping[str, Mapping[str, Any]] | None = None, show_excluded: bool = False,
                 per_subject: bool = False) -> tuple[list[str], list[list[Any]]]:
    """Rows ``group, n, mean ± std of each (header, metric, digits)``, then a row naming the worst group per column.

    ``n``: most values (excluded ones included) of any shown metric: volumes (subjects = volumes / 2, ED and ES), or
    subjects for ``per_subject`` metrics (clinical indices, on the ED row only). ``extra``: ``{header: {group:
    value}}`` columns of plain higher-is-better values (classification accuracy)."""
    extra = extra or {}
    headers = [group_label, "subjects" if per_subject else "volumes (subjects)", *[h for h, _, _ in columns], *extra]
    worst = summary.get("worst", {})
    rows: list[list[Any]] = []
    for g in _groups(summary):
        n = max((summary[g].get(m, {}).get("n", 0) + summary[g].get(m, {}).get("n_excluded", 0)
                 for _, m, _ in columns), default=0)
        rows.append([group_name(g, group_label), str(n) if per_subject or not n else f"{n} ({n // 2})",
                     *[_cell(summary[g], m, d, show_excluded) for _, m, d in columns],
                     *[fmt(vals.get(g)) for vals in extra.values()]])
    worst_extra = [group_name(min(vals, key=lambda k: vals[k]), group_label) if vals else "-"
                   for vals in extra.values()]
    named = [worst.get(_abs(m), {}).get("group") for _, m, _ in columns]
    rows.append(["worst", "", *["-" if g is None else group_name(str(g), group_label) for g in named],
                 *worst_extra])
    return headers, rows


def _dice_columns() -> list[tuple[str, str, int]]:
    return [(f"Dice {s}", f"Dice {s}", 3) for s in STRUCTURES] + [("Dice mean", MEAN_DICE, 3)]


def _distance_columns() -> list[tuple[str, str, int]]:
    return [(f"{m} {s} (mm)", f"{m} {s}", 2) for m in ("Hausdorff", "ASSD") for s in STRUCTURES]


def _clinical_columns() -> list[tuple[str, str, int]]:
    unit = {"EF": "%", "mass": "g"}
    return [(f"{idx} err ({unit.get(idx.split()[-1], 'ml')})", f"{idx} err", 1) for idx in CLINICAL_INDICES]


@dataclass(frozen=True)
class Grouping:
    """The grouping a report is written for (the run's ``data.group_by``): ``name`` ``vendor`` or ``centre``; its
    per-case column :attr:`key` and the summary of ``metrics.json`` it reads (:attr:`summary`)."""

    name: str

    @property
    def key(self) -> str:
        return self.name.capitalize()

    @property
    def summary(self) -> str:
        return f"by_{self.name}"

    @property
    def other(self) -> Grouping:
        return Grouping("centre" if self.name == "vendor" else "vendor")


def grouping_of(info: Mapping[str, Any], ev: Mapping[str, Any]) -> Grouping:
    """``info["group_by"]`` (what the pipeline passes), else inferred: centres when every evaluated group is a
    number, else vendors."""
    if info.get("group_by") in ("vendor", "centre"):
        return Grouping(str(info["group_by"]))
    groups = list(ev.get("group_metric") or {})
    return Grouping("centre" if groups and all(str(g).isdigit() for g in groups) else "vendor")


def _cls_accuracy(ev: Mapping[str, Any], grouping: Grouping = Grouping("vendor")) -> dict[str, float]:
    """Per-subject pathology accuracy per group: ``cls_acc_by_vendor`` for vendors, else the groups' mean of
    ``cls_correct`` in the summary."""
    acc = ev.get("cls_acc_by_vendor")
    if grouping.name == "vendor" and isinstance(acc, Mapping) and acc:
        return {str(k): float(v) for k, v in acc.items() if v is not None}
    summary = ev.get(grouping.summary, {})
    return {g: summary[g]["cls_correct"]["mean"] for g in _groups(summary)
            if summary[g].get("cls_correct", {}).get("mean") is not None}


def _present(summary: Mapping[str, Any], columns: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    groups = _groups(summary)
    return [c for c in columns if any(summary[g].get(c[1], {}).get("n") for g in groups)]


#: how a subject's pathology was decided (``metrics.json`` ``cls_from``, the run's ``model.cls_head``)
CLS_SOURCES = {
    "indices": "from the clinical indices of the predicted ED and ES masks: LV/RV volumes, EF, LV mass, with a "
               "classifier fitted on the training subjects' true indices",
    "encoder": "from the network's head on pooled encoder features, mean softmax over the slices with foreground",
    "morphology": "from the network's head on the predicted heart's shape, mean softmax over the slices with "
                  "foreground",
}


def _group_section(doc: Doc, ev: Mapping[str, Any], title: str, gr: Grouping) -> None:
    """The headline and the tables per group of the run's grouping ``gr``."""
    doc.heading(title)
    summary = ev.get(gr.summary)
    if not summary:
        doc.para(f"No per-{gr.name} summary in metrics.json.")
        return
    cls = _cls_accuracy(ev, gr)
    worst = summary.get("worst", {}).get(MEAN_DICE, {})
    if worst:
        groups = ev.get("group_metric") or {}
        headline = group_name(min(groups, key=groups.__getitem__), gr.key) if groups else "-"
        doc.para(f"Worst {gr.name} by mean Dice: {group_name(worst['group'], gr.key)} ({fmt(worst['value'])}). "
                 f"The run's headline, over the {gr.name}s it was trained and selected on "
                 f"({', '.join(group_name(str(g), gr.key) for g in groups)}): "
                 f"worst_group_metric = {fmt(ev.get('worst_group_metric'))} ({gr.name} {headline}), "
                 f"average_metric = {fmt(ev.get('average_metric'))}. Tables count volumes (subject x ED/ES) and, "
                 f"in brackets, subjects.")
    doc.table(*_group_table(summary, _present(summary, _dice_columns()), gr.key,
                            extra={"cls accuracy": cls} if cls else None))
    if ev.get("worst_vendor_cls_acc") is not None and cls:
        how = CLS_SOURCES.get(ev.get("cls_from", "encoder"), "")
        doc.para(f"Worst-{gr.name} pathology accuracy: {fmt(min(cls.values()))} (per subject; {how}).")
    doc.table(*_group_table(summary, _present(summary, _distance_columns()), gr.key, show_excluded=True))
    clinical = _present(summary, _clinical_columns())
    if clinical:
        doc.para("Clinical indices: error = predicted - true, mean ± std (MAE: mean absolute error); "
                 f"the worst row names the {gr.name} with the largest MAE.")
        doc.table(*_group_table(summary, clinical, gr.key, per_subject=True))


def _phase_section(doc: Doc, rows: Sequence[Mapping[str, Any]], gr: Grouping = Grouping("vendor")) -> None:
    phases = sorted({str(r.get("ED/ES", "")) for r in rows} - {""})
    if not phases:
        return
    summaries = {ph: summarise([r for r in rows if str(r.get("ED/ES")) == ph], gr.key) for ph in phases}
    groups = sorted({v for s in summaries.values() for v in _groups(s)}, key=lambda g: (len(g), g))
    headers = [gr.key, *[f"Dice {s} {ph}" for ph in phases for s in STRUCTURES]]
    table = [[group_name(v, gr.key), *[_cell(summaries[ph].get(v, {}), f"Dice {s}", 3) for ph in phases
                                        for s in STRUCTURES]]
             for v in groups]
    doc.heading(f"Test: Dice per {gr.name} and phase")
    doc.table(headers, table)


CI_COLUMNS = (MEAN_DICE, *(f"Dice {s}" for s in STRUCTURES))


def ci_note(group: str = "vendor") -> str:
    """The explanation of the bootstrap table per ``group`` (vendor or centre)."""
    return (
        f"95% percentile bootstrap intervals over subjects: {N_BOOT} resamples (seed {BOOT_SEED}) of each {group}'s "
        "subjects, drawn with replacement, a subject's ED and ES volumes kept together (they are not independent), "
        f"{group} sizes kept. They say how much a {group}'s mean Dice could move with other test subjects of that "
        f"{group}, not with another training seed. 'worst {group}' is the lowest {group} mean on each resample (the "
        f"worst {group} may change), 'all volumes' the mean over every volume. With a handful of subjects the "
        "interval is itself unreliable (and a single subject gives a point); overlapping intervals do not show that "
        f"two {group}s are alike.")


def dice_bootstrap(rows: Sequence[Mapping[str, Any]], key: str = "Vendor") -> GroupBootstrap:
    """Per-group bootstrap (:func:`groupdistil.stats.bootstrap_group_means`; groups: the per-case column ``key``) of
    the ``CI_COLUMNS`` of per-case rows, resampling subjects (``Code``, else ``Name``) within each group, so ED and
    ES stay together."""
    values = [[mean_dice(r), *(float(r[f"Dice {s}"]) for s in STRUCTURES)] for r in rows]
    return bootstrap_group_means(values, [str(r[key]) for r in rows], [_subject(r) for r in rows],
                                 group_names=_sorted_groups(rows, key))


def _ci_text(ci: Any) -> str:
    return "-" if math.isnan(ci.low) else f"{ci.estimate:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def _ci_section(doc: Doc, rows: Sequence[Mapping[str, Any]], split: str, gr: Grouping = Grouping("vendor")) -> None:
    boot = dice_bootstrap(rows, gr.key)
    sizes = [sum(str(r[gr.key]) == v for r in rows) for v in boot.groups]
    table = [[group_name(v, gr.key), int(boot.n_units[i]),
              *[_ci_text(boot.group_ci(v, j)) for j in range(len(CI_COLUMNS))]]
             for i, v in enumerate(boot.groups)]
    table.append([f"worst {gr.name}", int(boot.n_units.sum()),
                  *[_ci_text(boot.worst_ci(j)) for j in range(len(CI_COLUMNS))]])
    table.append(["all volumes", int(boot.n_units.sum()),
                  *[_ci_text(boot.weighted_ci(sizes, j)) for j in range(len(CI_COLUMNS))]])
    doc.heading(f"{split}: mean Dice per {gr.name} with 95% bootstrap intervals")
    doc.table([gr.key, "subjects", *CI_COLUMNS], table)
    doc.para(ci_note(gr.name), note=True)


def _other_grouping_section(doc: Doc, ev: Mapping[str, Any], gr: Grouping) -> None:
    """The grouping the run does not use (centres of a vendor run, vendors of a centre run), folded."""
    other = gr.other
    summary = ev.get(other.summary)
    if not summary:
        return
    cols = _present(summary, _dice_columns() + [(f"HD {s} (mm)", f"Hausdorff {s}", 2) for s in STRUCTURES])
    folded = Doc()
    folded.table(*_group_table(summary, cols, other.key))
    doc.heading(f"Test: per {other.name}")
    doc.details(f"Dice and Hausdorff per {other.name} (this run is grouped by {gr.name})", folded)


def _model_section(doc: Doc, info: Mapping[str, Any]) -> None:
    def params(v: Any) -> str:
        return f"{int(v):,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    probabilities = info.get("teacher")  # a teacher given as saved probabilities: no model, not evaluated
    role = "student" if info.get("teacher_params") is not None or probabilities else "model"  # a teacher run: none
    rows = [[role, params(info.get("params")), fmt(info.get("infer_seconds_per_case"), 4)]]
    if info.get("teacher_params") is not None or info.get("teacher_infer_seconds_per_case") is not None:
        rows.append(["teacher", params(info.get("teacher_params")),
                     fmt(info.get("teacher_infer_seconds_per_case"), 4)])
    elif probabilities:
        rows.append([f"teacher (saved probabilities {probabilities}: no model, not evaluated)", "-", "-"])
    doc.heading("Model size and speed")
    doc.table(["model", "parameters", "inference s / volume"], rows)
    if info.get("machine"):
        doc.para(timing_note(info["machine"]))


def _selection_section(doc: Doc, metrics: Mapping[str, Any]) -> None:
    def evals(entry: Any) -> dict[str, Mapping[str, Any]]:
        if not isinstance(entry, Mapping):
            return {}
        if "worst_group_metric" in entry:
            return {"val": entry}
        return {k: entry[k] for k in ("val", "test") if isinstance(entry.get(k), Mapping)}

    checkpoints = {"selected": {k: metrics[k] for k in ("val", "test") if isinstance(metrics.get(k), Mapping)},
                   "last": evals(metrics.get("last"))}
    rows = [[name, *[fmt(ev.get(split, {}).get(key)) for split in ("val", "test")
                     for key in ("worst_group_metric", "average_metric")]]
            for name, ev in checkpoints.items() if ev]
    headers = ["checkpoint", "val worst group", "val average", "test worst group", "test average"]
    doc.heading("Checkpoints")
    doc.para(f"Selected step: {fmt(metrics.get('selected_step'))}.")
    doc.table(headers, rows)


def write_mms_report(run_dir: Path, metrics: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Write ``report.md`` and ``report.html`` (plus the two PNGs they show) into ``run_dir``.

    ``metrics``: the engine's metrics.json (``selected_step``, ``val``, ``test``, ``last``); each evaluation holds
    ``by_vendor`` and ``by_centre`` (:func:`mms_pipeline.metrics.summarise`), ``worst_group_metric``,
    ``average_metric``, ``cls_acc_by_vendor``, ``worst_vendor_cls_acc``; any may be missing. ``info``: ``method``,
    ``seed``, ``train_seconds``, ``params``, ``teacher_params``, ``infer_seconds_per_case``,
    ``teacher_infer_seconds_per_case``; any may be missing. With ``predictions`` in ``info`` (``groupdistil evaluate``:
    also ``naming``, ``data_root``) the report describes scored predictions: no model, timing or checkpoint sections.
    ``info["group_by"]`` (``vendor`` or ``centre``; inferred from the group names when absent) is the grouping of
    every section: headline, tables, bootstrap intervals, box plots, examples; the other grouping is folded. The
    bootstrap intervals (:func:`dice_bootstrap`) come from ``per_case.csv``.
    """
    run_dir = Path(run_dir)
    ev = metrics.get("test") or metrics.get("val") or {}
    split = "Test" if metrics.get("test") else "Validation"
    scored = "predictions" in info  # groupdistil evaluate: label maps made elsewhere
    doc = Doc()
    if scored:
        doc.para(f"Predictions {info['predictions']} ({info.get('naming', '-')} file names) scored against "
                 f"{info.get('data_root', '-')}, {split.lower()} split.")
    else:
        doc.para(f"Method: {info.get('method', '-')}, seed {fmt(info.get('seed'))}, "
                 f"training time {fmt(info.get('train_seconds'), 0)} s.")
        _model_section(doc, info)
    gr = grouping_of(info, ev)
    _group_section(doc, ev, f"{split}: per {gr.name}", gr)
    teacher = ev.get("teacher")
    if isinstance(teacher, Mapping) and teacher.get(gr.summary):
        doc.heading(f"{split}: teacher per {gr.name}")
        doc.table(*_group_table(teacher[gr.summary], _present(teacher[gr.summary], _dice_columns()), gr.key))
    per_case = run_dir / PER_CASE_FILE
    rows = read_per_case_csv(per_case) if per_case.exists() else []
    if rows:
        _ci_section(doc, rows, "Test", gr)
        _phase_section(doc, rows, gr)
        doc.heading(f"Dice per {gr.name}")
        doc.image(dice_boxplot(rows, run_dir / BOXPLOT_FILE, gr.key), "Dice box plots")
    else:
        doc.para(f"No {PER_CASE_FILE}: no box plots.")
    examples_path = run_dir / EXAMPLES_FILE
    if examples_path.exists() and (examples := load_examples(examples_path)):
        doc.heading(f"Examples: best and worst case per {gr.name}")
        doc.para("Mid-ventricular slice; LV red, MYO green, RV blue.")
        doc.image(examples_figure(examples, run_dir / EXAMPLES_PNG), "example slices")
    _other_grouping_section(doc, ev, gr)
    if not scored:
        _selection_section(doc, metrics)
    doc.heading("How empty predictions are scored")
    doc.para(EMPTY_NOTE)
    doc.write(run_dir, f"M&Ms-1 segmentation: {'scored predictions' if scored else info.get('method', 'run')}")
