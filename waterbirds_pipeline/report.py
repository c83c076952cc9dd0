"""Waterbirds outputs: ``predictions.csv`` (every val and test image) and ``report.md`` / ``report.html``; reading a
predictions CSV made elsewhere (:func:`read_predictions`, for ``groupdistil evaluate``); what ``groupdistil compare``
reads of a finished run (:class:`WaterbirdsComparison`)."""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
from matplotlib.figure import Figure

from groupdistil.errors import UserError
from groupdistil.io import atomic_write_text
from groupdistil.pipeline import ComparisonHooks
from groupdistil.report import Doc, fmt, save_figure, timing_note
from groupdistil.stats import BOOT_SEED, N_BOOT, BootstrapCI, bootstrap_group_means
from groupdistil.teacher import probabilities_problem

from .metadata import CLASS_NAMES, METADATA, SPLITS, Metadata
from .metrics import ACCURACY_DEFINITIONS

PREDICTIONS = "predictions.csv"
#: the columns of ``predictions.csv``, in this order; a column no row fills is left out
PREDICTION_COLUMNS = ("img_id", "split", "y", "place", "group", "prediction", "teacher_prediction")
SUMMARY_KEYS = ("worst_group_acc", "worst_group", "avg_acc", "train_weighted_avg_acc", "mean_group_acc")
PLOT = "group_accuracy_test.png"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``predictions.csv`` as dicts (none when the file is missing)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` atomically with the :data:`PREDICTION_COLUMNS` that any row fills."""
    columns = [c for c in PREDICTION_COLUMNS if any(r.get(c, "") != "" for r in rows)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def update_predictions(path: Path, split: str, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the rows of ``split`` in the CSV at ``path`` (created when missing) by ``rows``, val before test."""
    kept = [r for r in _read_rows(Path(path)) if r.get("split") != split]
    _write_rows(Path(path), sorted([*kept, *rows], key=lambda r: SPLITS.index(r["split"])))


def set_split_column(path: Path, split: str, column: str, values: dict[str, Any]) -> None:
    """Set ``column`` of every row of ``split`` in the CSV at ``path`` to ``values[img_id]``, rows and the other
    columns kept; a UserError when the file's rows of ``split`` are not exactly the images of ``values``."""
    path = Path(path)
    rows = _read_rows(path)
    ids = [r["img_id"] for r in rows if r.get("split") == split]
    if len(ids) != len(values) or set(ids) != set(values):
        raise UserError(f"{path}: its {len(ids)} {split} rows are not the {len(values)} {split} images whose "
                        f"{column} is to be added (evaluate writes them first)")
    for r in rows:
        if r.get("split") == split:
            r[column] = values[r["img_id"]]
    _write_rows(path, rows)


def case_scores(path: Path) -> list[tuple[str, str, float]] | None:
    """``(img_id, group, 1.0 if correct else 0.0)`` of each test row of a ``predictions.csv``; None if missing."""
    if not Path(path).is_file():
        return None
    return [(r["img_id"], r["group"], float(r["prediction"] == r["y"]))
            for r in _read_rows(Path(path)) if r["split"] == "test"]


class WaterbirdsComparison(ComparisonHooks):
    """What ``groupdistil compare`` reads of finished Waterbirds runs: the metrics' meaning and per-image scores."""

    case_unit: ClassVar[str] = "images"

    @classmethod
    def metric_note(cls, cfg: dict[str, Any]) -> str:
        return ("Worst-group metric: the lowest test accuracy over the four (bird, background) groups. Average "
                "metric: the per-group test accuracies weighted by the training group proportions (the group DRO "
                "paper's average; not the raw test accuracy).")

    @classmethod
    def case_scores(cls, run_dir: Path) -> list[tuple[str, str, float]] | None:
        """``(img_id, group, 1.0 if correct else 0.0)`` of each test image, from ``predictions.csv``."""
        return case_scores(Path(run_dir) / PREDICTIONS)


def read_predictions(path: Path, meta: Metadata, split: str) -> np.ndarray:
    """The predicted class (0 landbird, 1 waterbird) of every image of ``split``, int64 in split order, from a CSV
    with columns ``img_id`` and ``prediction`` (others ignored; UTF-8, a byte-order mark is fine).

    With a ``split`` column (a run's ``predictions.csv``) the rows of other splits are ignored; without one every row
    must be an image of ``split``. Each problem is a UserError naming the file and line: a missing column, an
    ``img_id`` that is not in ``metadata.csv`` or belongs to another split, an ``img_id`` listed twice, a prediction
    that is not 0 or 1, an image of the split without a prediction.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not a file (Waterbirds predictions are a CSV with columns img_id, prediction)")

    def parse(row: dict[str, str], where: str) -> int:
        value = (row.get("prediction") or "").strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if number not in (0.0, 1.0):
            raise UserError(f"{where}: prediction '{value}' is not a class (0 {CLASS_NAMES[0]}, 1 {CLASS_NAMES[1]})")
        return int(number)

    values = read_image_table(path, meta, split, ("prediction",), parse, "prediction")
    return np.asarray(values, dtype=np.int64)


#: the columns of a teacher-probabilities CSV after ``img_id``: ``p<k>`` the probability of class k
PROB_COLUMNS = tuple(f"p{k}" for k in range(len(CLASS_NAMES)))


def read_teacher_probabilities(path: Path, meta: Metadata) -> np.ndarray:
    """A teacher's class probabilities of every training image, float64 ``(N_train, 2)`` in training-split order,
    from a CSV with columns ``img_id, p0, p1`` (``p<k>``: the probability of class k, 0 landbird, 1 waterbird; other
    columns ignored; with a ``split`` column only the ``train`` rows are read).

    Each problem is a UserError naming the file and line, as in :func:`read_predictions` (missing column, unknown,
    other-split or repeated ``img_id``, a training image without a row), and: a value that is not a number, not
    finite or outside [0, 1]; a row whose probabilities do not sum to 1 (:data:`groupdistil.teacher.PROB_SUM_ATOL`).
    """
    def parse(row: dict[str, str], where: str) -> list[float]:
        try:
            p = [float((row.get(c) or "").strip()) for c in PROB_COLUMNS]
        except ValueError:
            cells = ", ".join(f"{c} '{(row.get(c) or '').strip()}'" for c in PROB_COLUMNS)
            raise UserError(f"{where}: {cells}: not numbers") from None
        problem = probabilities_problem(np.asarray(p), "(class)")
        if problem:
            raise UserError(f"{where}: {', '.join(f'{c} {v:g}' for c, v in zip(PROB_COLUMNS, p))}: {problem}")
        return p

    values = read_image_table(Path(path), meta, "train", PROB_COLUMNS, parse, "teacher probability")
    return np.asarray(values, dtype=np.float64)


def read_image_table(path: Path, meta: Metadata, split: str, columns: Sequence[str],
                     parse: Callable[[dict[str, str], str], Any], what: str) -> list[Any]:
    """``parse(row, where)`` of the row of every image of ``split``, in split order, from a UTF-8 CSV with
    ``img_id`` and ``columns`` (see :func:`read_predictions` for the rules; ``where`` is ``FILE:LINE (img_id N)``)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("img_id", *columns) if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; found: {', '.join(header) or '(none)'}")
    reader.fieldnames = header
    wanted = meta.where(split)
    position = {int(meta.img_id[r]): i for i, r in enumerate(wanted)}
    row_of = {int(i): r for r, i in enumerate(meta.img_id)}
    values: list[Any] = [None] * len(wanted)
    first: dict[int, int] = {}
    for row in reader:
        line = reader.line_num
        if "split" in header:
            if (row.get("split") or "").strip() not in SPLITS:
                raise UserError(f"{path}:{line}: split '{row.get('split')}' is not one of {', '.join(SPLITS)}")
            if row["split"].strip() != split:
                continue
        raw_id = (row.get("img_id") or "").strip()
        if not raw_id.isdigit():
            raise UserError(f"{path}:{line}: img_id '{raw_id}' is not a non-negative integer")
        img_id = int(raw_id)
        where = f"{path}:{line} (img_id {img_id})"
        if img_id not in row_of:
            raise UserError(f"{where}: no image with this img_id in {meta.root / METADATA}")
        if img_id not in position:
            other = SPLITS[int(meta.split[row_of[img_id]])]
            raise UserError(f"{where}: an image of the {other} split, not of {split} (list the {split} images only, "
                            f"or add a 'split' column)")
        if img_id in first:
            raise UserError(f"{where}: img_id listed twice (first at line {first[img_id]})")
        first[img_id] = line
        values[position[img_id]] = parse(row, where)
    absent = [i for i, v in enumerate(values) if v is None]
    if absent:
        r = wanted[absent[0]]
        raise UserError(f"{path}: no {what} for {len(absent)} {split} image(s), e.g. img_id {meta.img_id[r]} "
                        f"({meta.describe(r)})")
    return values


def _teacher_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The teacher's ``{split: evaluate dict}``: the engine's ``teacher`` entry, else what evaluate attached."""
    if metrics.get("teacher"):
        return metrics["teacher"]
    return {s: metrics[s]["teacher"] for s in ("val", "test") if "teacher" in (metrics.get(s) or {})}


def _summary_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    """One row per evaluated (model, split): the five headline numbers."""
    step, last = metrics.get("selected_step"), metrics.get("last") or {}
    selected = f"selected (step {fmt(step)})" if "selected_step" in metrics else "predictions"
    sources = [(selected, metrics), (f"last (step {fmt(last.get('step'))})", last),
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


CI_NOTE = (
    f"95% percentile bootstrap intervals over the test images: {N_BOOT} resamples (seed {BOOT_SEED}) of the images "
    "of each group, drawn with replacement, group sizes kept. They say how much an accuracy could move with other "
    "test images of the same kind, not with another training seed. The worst-group interval is that of the lowest "
    "group accuracy on each resample, so it can sit below the worst group's own interval. Overlapping group intervals "
    "do not show that two groups are alike; a narrow interval on a few images is not to be trusted either.")


def accuracy_cis(path: Path, group_names: Sequence[str], train_counts: Sequence[int]) -> dict[str, BootstrapCI]:
    """Bootstrap CIs (:func:`groupdistil.stats.bootstrap_group_means`, images resampled within each group) of each
    group's test accuracy and of the four summary accuracies, from the test rows of ``predictions.csv``; {} without
    any."""
    scores = case_scores(path) or []
    if not scores:
        return {}
    present = [g for g in group_names if any(s[1] == g for s in scores)]
    boot = bootstrap_group_means([s[2] for s in scores], [s[1] for s in scores], group_names=present)
    sizes = [int(n) for n in boot.n_units]
    train = [train_counts[list(group_names).index(g)] for g in present]
    out = {g: boot.group_ci(g) for g in present}
    out["worst_group_acc"] = boot.worst_ci()
    out["avg_acc"] = boot.weighted_ci(sizes)
    if sum(train) > 0:
        out["train_weighted_avg_acc"] = boot.weighted_ci(train)
    out["mean_group_acc"] = boot.weighted_ci([1.0] * len(present))
    return out


def fmt_ci(ci: BootstrapCI | None, digits: int = 3) -> str:
    """``[low, high]`` of an interval, '-' without one."""
    if ci is None or math.isnan(ci.low):
        return "-"
    return f"[{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def _ci_section(doc: Doc, run_dir: Path, group_names: Sequence[str], train_counts: Sequence[int]) -> None:
    cis = accuracy_cis(run_dir / PREDICTIONS, group_names, train_counts)
    if not cis:
        return
    doc.heading("Test accuracies with 95% bootstrap intervals")
    doc.table(["accuracy", "n images", "value", "95% CI"],
              [[k, cis[k].n, cis[k].estimate, fmt_ci(cis[k])] for k in cis])
    doc.para(CI_NOTE, note=True)


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
    _ci_section(doc, run_dir, group_names, train_counts)
    scored = "predictions" in info  # groupdistil evaluate: predictions made elsewhere
    doc.heading("Scored predictions" if scored else "Run")
    doc.table(["key", "value"], _info_rows(info))
    if info.get("machine"):
        doc.para(timing_note(info["machine"]))
    title = "scored predictions" if scored else f"{info.get('method', 'run')} (seed {info.get('seed', '-')})"
    doc.write(run_dir, f"Waterbirds: {title}")
