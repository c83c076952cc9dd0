"""Waterbirds outputs: ``predictions.csv`` (every val and test image) and ``report.md`` / ``report.html``."""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from groupdistil.io import atomic_write_text
from groupdistil.report import Doc, fmt, save_figure

from .metadata import SPLITS
from .metrics import ACCURACY_DEFINITIONS

PREDICTION_COLUMNS = ("img_id", "split", "y", "place", "group", "prediction", "teacher_prediction")
SUMMARY_KEYS = ("worst_group_acc", "worst_group", "avg_acc", "train_weighted_avg_acc", "mean_group_acc")
PLOT = "group_accuracy_test.png"


def update_predictions(path: Path, split: str, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the rows of ``split`` in the CSV at ``path`` (created when missing) by ``rows``, val before test."""
    path = Path(path)
    kept: list[dict[str, Any]] = []
    if path.is_file():
        with open(path, newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if r.get("split") != split]
    merged = sorted([*kept, *rows], key=lambda r: SPLITS.index(r["split"]))
    columns = [c for c in PREDICTION_COLUMNS if any(r.get(c, "") != "" for r in merged)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(merged)
    atomic_write_text(path, buf.getvalue())


def case_scores(path: Path) -> list[tuple[str, str, float]] | None:
    """``(img_id, group, 1.0 if correct else 0.0)`` of each test row of a ``predictions.csv``; None if missing."""
    if not Path(path).is_file():
        return None
    with open(path, newline="") as fh:
        return [(r["img_id"], r["group"], float(r["prediction"] == r["y"]))
                for r in csv.DictReader(fh) if r["split"] == "test"]


def _teacher_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ``{split: evaluate dict}``: the engine's ``teacher`` entry, else what evaluate attached."""
    if metrics.get("teacher"):
        return metrics["teacher"]
    return {s: metrics[s]["teacher"] for s in ("val", "test") if "teacher" in (metrics.get(s) or {})}


def _summary_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """One row per evaluated (model, split): the five headline numbers."""
    step, last = metrics.get("selected_step"), metrics.get("last") or {}
    sources = [(f"selected (step {fmt(step)})", metrics), (f"last (step {fmt(last.get('step'))})", last),
               ("teacher", _teacher_metrics(metrics))]
    return [[f"{label} {split}", *(m[split].get(k) for k in SUMMARY_KEYS)]
            for label, m in sources for split in ("val", "test") if m.get(split)]


def _group_rows(metrics: dict[str, Any], group_names: Sequence[str], train_counts: Sequence[int]
                ) -> tuple[list[str], list[list[Any]]]:
    teacher = _teacher_metrics(metrics)
    headers = ["group", "train n", "val n", "val acc", "test n", "test acc"]
    headers += [f"teacher {s} acc" for s in ("val", "test") if teacher.get(s)]
    rows = []
    for g, name in enumerate(group_names):
        row = [name, train_counts[g]]
        for split in ("val", "test"):
            m = metrics.get(split) or {}
            row += [(m.get("group_n") or {}).get(name), (m.get("group_acc") or {}).get(name)]
        row += [teacher[s]["group_acc"].get(name) for s in ("val", "test") if teacher.get(s)]
        rows.append(row)
    return headers, rows


def plot_group_accuracy(path: Path, metrics: dict[str, Any], group_names: Sequence[str]) -> None:
    """Bar chart of per-group test accuracy (the teacher's beside it when present), written atomically as PNG."""
    series = [("model", metrics.get("test") or {}), ("teacher", _teacher_metrics(metrics).get("test") or {})]
    series = [(label, m) for label, m in series if m.get("group_acc")]
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for k, (label, m) in enumerate(series):
        accs = [m["group_acc"].get(name) or 0.0 for name in group_names]
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(group_names))]
        bars = ax.bar(xs, accs, width, label=label)
        ax.bar_label(bars, labels=[fmt(a, 2) for a in accs], fontsize=8)
    ax.set_xticks(range(len(group_names)), group_names, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("test accuracy")
    ax.set_title("Per-group test accuracy")
    if series:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(series), fontsize=8, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)


def _info_rows(info: dict[str, Any]) -> list[list[Any]]:
    return [[k, v] for k, v in info.items() if isinstance(v, (int, float, str, bool)) or v is None]


def write_report(run_dir: Path, metrics: dict[str, Any], info: dict[str, Any], group_names: Sequence[str],
                 train_counts: Sequence[int]) -> None:
    """``report.md`` and ``report.html`` (with the per-group bar chart ``group_accuracy_test.png``) in ``run_dir``."""
    run_dir = Path(run_dir)
    plot = run_dir / PLOT
    plot_group_accuracy(plot, metrics, group_names)
    doc = Doc()
    doc.heading("Summary")
    doc.table(["model / split", *SUMMARY_KEYS], _summary_rows(metrics))
    doc.heading("Accuracy definitions")
    defs = ACCURACY_DEFINITIONS.items()
    doc.raw("\n".join(f"- `{k}`: {v}" for k, v in defs),
            "<ul>" + "".join(f"<li><code>{k}</code>: {html.escape(v)}</li>" for k, v in defs) + "</ul>")
    doc.heading("Per-group accuracy (selected model)")
    doc.table(*_group_rows(metrics, group_names, train_counts))
    doc.image(plot, "per-group test accuracy")
    doc.heading("Run")
    doc.table(["key", "value"], _info_rows(info))
    doc.write(run_dir, f"Waterbirds: {info.get('method', 'run')} (seed {info.get('seed', '-')})")
