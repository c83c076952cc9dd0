"""M&Ms-1 evaluation: per-volume overlap and surface metrics, clinical indices, per-group summaries, per-case CSV.

Conventions (those of the official ``metrics_mnms.py``, which calls medpy's ``dc``, ``jc``, ``hd`` and ``assd`` with
the header zooms as voxel spacing and the default face connectivity):

- one 3-D label volume (x, y, z) per subject and phase; labels ``STRUCTURES`` (0 is background);
- surface of a binary object = the object minus its erosion by the face-connected (6-neighbour) structuring element,
  voxels outside the array counting as background (MONAI ``get_mask_edges`` without spacing does exactly this);
- directed surface distances: from each surface voxel of one object to the nearest surface voxel of the other,
  Euclidean in mm from the voxel spacing (MONAI ``get_surface_distance``; exact, via a KD-tree);
- ``Hausdorff`` = max over both directions (the maximum, not HD95);
  ``HD95`` = 95th percentile (linear interpolation) of both directions pooled (medpy ``hd95``);
  ``ASSD`` = mean of the two directed mean distances (medpy ``assd``).
  MONAI's ``compute_average_surface_distance(symmetric=True)`` pools both directions into one mean and its HD95
  takes the larger directed percentile, so those two are computed here from MONAI's surface distances instead.

Empty structures (the challenge only defines the first case):

- empty prediction, non-empty truth: Dice = Jaccard = 0, Hausdorff = HD95 = ASSD = ``EMPTY_DISTANCE`` (-1);
- non-empty prediction, empty truth: Dice = Jaccard = 0, distances -1 (undefined: medpy raises);
- both empty: Dice = Jaccard = 1, distances 0 (``BOTH_EMPTY``: perfect agreement).

Summaries exclude the -1 distance entries from means, standard deviations and medians and count them in
``n_excluded``; they never average the -1s in.
"""
from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou
from monai.metrics.utils import get_mask_edges, get_surface_distance

from groupdistil.io import atomic_write_text

STRUCTURES: dict[str, int] = {"LV": 1, "MYO": 2, "RV": 3}
OVERLAP_METRICS = ("Dice", "Jaccard")
DISTANCE_METRICS = ("Hausdorff", "HD95", "ASSD")

#: distance recorded when exactly one of prediction and truth is empty (the challenge's marker)
EMPTY_DISTANCE = -1.0
#: values recorded when both prediction and truth are empty
BOTH_EMPTY: dict[str, float] = {"Dice": 1.0, "Jaccard": 1.0, "Hausdorff": 0.0, "HD95": 0.0, "ASSD": 0.0}
#: myocardial tissue density, g/ml (LV mass = MYO volume x density)
MYOCARDIAL_DENSITY = 1.05

ID_COLUMNS = ("Name", "ED/ES", "Vendor", "Centre", "Code")
OFFICIAL_COLUMNS: tuple[str, ...] = ("Name", "ED/ES", "Vendor", "Centre") + tuple(
    f"{m} {s}" for s in STRUCTURES for m in ("Dice", "Jaccard", "Hausdorff", "ASSD")
)
CLINICAL_INDICES = ("LV EDV", "LV ESV", "LV EF", "RV EDV", "RV ESV", "RV EF", "LV mass")
CLINICAL_COLUMNS: tuple[str, ...] = tuple(f"{i}{sfx}" for i in CLINICAL_INDICES for sfx in ("", " true", " err"))
#: official header, then the extras in this order; other keys of the rows follow, sorted
PER_CASE_COLUMNS: tuple[str, ...] = (
    OFFICIAL_COLUMNS + tuple(f"HD95 {s}" for s in STRUCTURES) + ("Code",) + CLINICAL_COLUMNS + ("cls_correct",)
)
#: derived metric added by :func:`summarise`
MEAN_DICE = "Dice mean"


# --- per volume ---------------------------------------------------------------------------------------------------
def _check_pair(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    if len(spacing) != gt.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {gt.ndim}-D volume")
    if any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")


def _one_hot(labels: np.ndarray) -> torch.Tensor:
    """(x, y, z) labels -> float64 (1, len(STRUCTURES), x, y, z) one-hot of the structures (background dropped)."""
    return torch.from_numpy(np.stack([labels == v for v in STRUCTURES.values()])[None]).double()


def surface_distances(pred: np.ndarray, gt: np.ndarray,
                      spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm) of two non-empty binary masks: (pred -> gt, gt -> pred), float64 1-D.

    No cropping inside: scipy's erosion counts voxels beyond the array as background, like a zero border."""
    edges_pred, edges_gt = get_mask_edges(pred.astype(bool), gt.astype(bool), crop=False)
    sp = [float(s) for s in spacing]
    d_pg = get_surface_distance(edges_pred, edges_gt, distance_metric="euclidean", spacing=sp)
    d_gp = get_surface_distance(edges_gt, edges_pred, distance_metric="euclidean", spacing=sp)
    return np.asarray(d_pg, dtype=np.float64), np.asarray(d_gp, dtype=np.float64)


def surface_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """``{"Hausdorff", "HD95", "ASSD"}`` in mm for two binary masks, with the empty conventions of the module."""
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return {m: BOTH_EMPTY[m] for m in DISTANCE_METRICS}
    if not (has_pred and has_gt):
        return {m: EMPTY_DISTANCE for m in DISTANCE_METRICS}
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return {
        "Hausdorff": float(max(d_pg.max(), d_gp.max())),
        "HD95": float(np.percentile(np.concatenate([d_pg, d_gp]), 95)),
        "ASSD": float((d_pg.mean() + d_gp.mean()) / 2),
    }


def _foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean mask, as slices."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def case_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Metrics of one volume: ``"Dice LV", "Jaccard LV", "Hausdorff LV", "HD95 LV", "ASSD LV"``, ... for each structure.

    ``pred``, ``gt``: int label volumes (x, y, z) in native geometry; ``spacing``: voxel size (mm) per axis.
    Dice = 2|P∩G| / (|P|+|G|), Jaccard = |P∩G| / |P∪G| (MONAI, ``ignore_empty=False``: both empty gives 1).
    Both volumes are first cropped to the box of their joint foreground: no metric changes (outside voxels are
    background for every structure, as the zero border the surface extraction adds), all run faster.
    """
    _check_pair(pred, gt, spacing)
    foreground = (pred > 0) | (gt > 0)
    if foreground.any():
        box = _foreground_box(foreground)
        pred, gt = pred[box], gt[box]
    p, g = _one_hot(pred), _one_hot(gt)
    dice = compute_dice(p, g, include_background=True, ignore_empty=False)[0]
    jaccard = compute_iou(p, g, include_background=True, ignore_empty=False)[0]
    out: dict[str, float] = {}
    for i, (name, label) in enumerate(STRUCTURES.items()):
        out[f"Dice {name}"] = float(dice[i])
        out[f"Jaccard {name}"] = float(jaccard[i])
        for metric, value in surface_metrics(pred == label, gt == label, spacing).items():
            out[f"{metric} {name}"] = value
    return out


def mean_dice(row: Mapping[str, Any]) -> float:
    """Mean Dice over LV, MYO and RV of one per-case row."""
    return float(np.mean([float(row[f"Dice {s}"]) for s in STRUCTURES]))


# --- clinical indices ---------------------------------------------------------------------------------------------
def clinical_volumes(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """``{"LV volume", "MYO volume", "RV volume"}`` in ml (voxel count x prod(spacing) / 1000), ``"LV mass"`` in g
    (MYO volume x ``MYOCARDIAL_DENSITY``)."""
    ml_per_voxel = float(np.prod([float(s) for s in spacing])) / 1000.0
    vols = {f"{name} volume": float(np.count_nonzero(mask == label)) * ml_per_voxel
            for name, label in STRUCTURES.items()}
    vols["LV mass"] = vols["MYO volume"] * MYOCARDIAL_DENSITY
    return vols


def _ejection_fraction(edv: float, esv: float) -> float:
    """EF (%) = 100 (EDV - ESV) / EDV; NaN when EDV is 0."""
    return 100.0 * (edv - esv) / edv if edv > 0 else math.nan


def _indices(ed: Mapping[str, float], es: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for v in ("LV", "RV"):
        edv, esv = ed[f"{v} volume"], es[f"{v} volume"]
        out.update({f"{v} EDV": edv, f"{v} ESV": esv, f"{v} EF": _ejection_fraction(edv, esv)})
    out["LV mass"] = ed["LV mass"]
    return out


def clinical_indices(ed_pred: np.ndarray, es_pred: np.ndarray, ed_gt: np.ndarray, es_gt: np.ndarray,
                     spacing_ed: Sequence[float], spacing_es: Sequence[float]) -> dict[str, float]:
    """``CLINICAL_INDICES`` of one subject, predicted (``"LV EDV"``), true (``"LV EDV true"``) and error
    (``"LV EDV err"`` = predicted - true). Volumes in ml, EF in %, LV mass (at ED) in g."""
    pred = _indices(clinical_volumes(ed_pred, spacing_ed), clinical_volumes(es_pred, spacing_es))
    true = _indices(clinical_volumes(ed_gt, spacing_ed), clinical_volumes(es_gt, spacing_es))
    out: dict[str, float] = {}
    for k in CLINICAL_INDICES:
        out[k], out[f"{k} true"], out[f"{k} err"] = pred[k], true[k], pred[k] - true[k]
    return out


# --- summaries ----------------------------------------------------------------------------------------------------
def metric_direction(name: str) -> int:
    """+1 when higher is better (Dice, Jaccard, classification), -1 when lower is better (distances, absolute
    errors), 0 when a worst group means nothing (signed errors, raw volumes)."""
    if name.startswith(OVERLAP_METRICS) or name.startswith("cls"):
        return 1
    if name.startswith(DISTANCE_METRICS) or name.endswith(" abs err"):
        return -1
    return 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating))


def per_case_columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Column order: the official header, the known extras present in ``rows``, then any other keys sorted."""
    keys: set[str] = set()
    for r in rows:
        keys.update(r)
    known = [c for c in PER_CASE_COLUMNS[len(OFFICIAL_COLUMNS):] if c in keys]
    return [*OFFICIAL_COLUMNS, *known, *sorted(keys - set(PER_CASE_COLUMNS))]


def _value_table(rows: Sequence[Mapping[str, Any]], group_key: str | None) -> tuple[list[str], np.ndarray]:
    """(metric names, float (N, M) table, NaN where missing) with derived ``Dice mean`` and ``<x> abs err``."""
    skip = set(ID_COLUMNS) | {group_key}
    names = [c for c in per_case_columns(rows)
             if c not in skip and any(_is_number(r.get(c)) for r in rows)]
    table = np.array([[float(r[c]) if _is_number(r.get(c)) else math.nan for c in names] for r in rows],
                     dtype=np.float64).reshape(len(rows), len(names))
    derived, cols = [], []
    if MEAN_DICE not in names and all(f"Dice {s}" in names for s in STRUCTURES):
        derived.append(MEAN_DICE)
        cols.append(table[:, [names.index(f"Dice {s}") for s in STRUCTURES]].mean(axis=1))
    for c in [c for c in names if c.endswith(" err") and f"{c[:-len(' err')]} abs err" not in names]:
        derived.append(f"{c[:-len(' err')]} abs err")
        cols.append(np.abs(table[:, names.index(c)]))
    if derived:
        table = np.concatenate([table, np.stack(cols, axis=1)], axis=1)
    return names + derived, table


def _column_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per column of (n, M) values with NaN as missing: n, mean, std (ddof=1), median (numpy's nan-statistics)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns and n < 2 give NaN (reported as None)
        return {"n": np.count_nonzero(~np.isnan(values), axis=0), "mean": np.nanmean(values, axis=0),
                "std": np.nanstd(values, axis=0, ddof=1), "median": np.nanmedian(values, axis=0)}


def summarise(rows: Sequence[Mapping[str, Any]], group_key: str | None) -> dict[str, Any]:
    """Per-group statistics of every numeric column of per-case ``rows``.

    Returns ``{group: {metric: {"mean", "std", "n", "median", "n_excluded"}}, ..., "worst": {metric: {"group",
    "value"}}}``. Groups are ``str(row[group_key])`` (one group ``"all"`` when ``group_key`` is None). Missing
    values and NaN are skipped; distance entries < 0 (empty structures) are excluded and counted in
    ``n_excluded``. ``std`` uses ddof=1; undefined statistics are None. Derived metrics: ``"Dice mean"`` (mean
    of the three Dice) and ``"<index> abs err"`` for each ``"<index> err"``. ``"worst"`` holds, for each metric
    with a direction (:func:`metric_direction`), the group with the lowest (higher-is-better) or highest mean.
    """
    names, table = _value_table(rows, group_key)
    is_distance = np.array([c.startswith(DISTANCE_METRICS) for c in names], dtype=bool)
    excluded = is_distance[None, :] & (table < 0)
    table = np.where(excluded, math.nan, table)
    groups = np.array(["all" if group_key is None else str(r.get(group_key)) for r in rows])
    out: dict[str, Any] = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        s = _column_stats(table[sel])
        n_excl = excluded[sel].sum(axis=0)
        out[g] = {
            c: {
                "mean": float(s["mean"][j]) if s["n"][j] else None,
                "std": float(s["std"][j]) if s["n"][j] > 1 else None,
                "n": int(s["n"][j]),
                "median": float(s["median"][j]) if s["n"][j] else None,
                "n_excluded": int(n_excl[j]),
            }
            for j, c in enumerate(names)
        }
    out["worst"] = _worst_groups(out, names)
    return out


def _worst_groups(by_group: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  names: Sequence[str]) -> dict[str, dict[str, Any]]:
    worst: dict[str, dict[str, Any]] = {}
    for c in names:
        direction = metric_direction(c)
        means = [(g, stats[c]["mean"]) for g, stats in by_group.items() if stats[c]["mean"] is not None]
        if direction == 0 or not means:
            continue
        g, v = min(means, key=lambda gv: direction * gv[1])
        worst[c] = {"group": g, "value": v}
    return worst


# --- per-case CSV -------------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    if isinstance(v, (np.integer,)):
        return str(int(v))
    return str(v)


def write_per_case_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` atomically with :func:`per_case_columns`; floats exactly (``repr``), missing/NaN empty."""
    cols = per_case_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    writer.writerows([[_cell(r.get(c)) for c in cols] for r in rows])
    atomic_write_text(path, buf.getvalue())


def read_per_case_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a per-case CSV: ``ID_COLUMNS`` as str, other cells as float (empty cells -> NaN)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))

    def parse(k: str, v: str) -> Any:
        if k in ID_COLUMNS:
            return v
        try:
            return float(v) if v != "" else math.nan
        except ValueError:
            return v

    return [{k: parse(k, v) for k, v in r.items()} for r in rows]
