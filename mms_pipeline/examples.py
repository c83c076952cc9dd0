"""The example slices of an M&Ms-1 report: chosen during the test evaluation, saved as ``examples.npz``, drawn
as ``report_examples.png``.

``examples.npz`` (:func:`save_examples`), layout, for ``n`` examples ``i = 0 .. n-1``:

========================  ================  ==========================================================
key                       dtype, shape      content
========================  ================  ==========================================================
``image_{i}``             float32 (X, Y)    image slice (native geometry, slice ``slice[i]`` of (X, Y, Z))
``gt_{i}``, ``pred_{i}``  uint8 (X, Y)      ground truth and predicted labels of that slice
``caption``               str (n,)          one line describing the example
``vendor``, ``group``,    str (n,)          vendor, group (vendor or centre, as the run was grouped), ``"best"``
``kind``, ``name``,                         or ``"worst"``, case name, phase (``group`` absent in older files)
``phase``
``dice``                  float64 (n,)      mean Dice (LV, MYO, RV) of the 3-D case
``slice``                 int64 (n,)        index of the slice along z
========================  ================  ==========================================================

The evaluation fills it with an :class:`ExampleCollector`: per group of the run's ``data.group_by`` (vendor or
centre) it keeps the case with the best and the worst mean Dice, and of each the mid-ventricular slice with the most
foreground.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from groupdistil.io import atomic_write_bytes
from groupdistil.report import save_figure

from .metrics import mean_dice
from .splits import group_name

EXAMPLES_FILE = "examples.npz"
EXAMPLES_PNG = "report_examples.png"
_STR_FIELDS = ("caption", "vendor", "group", "kind", "name", "phase")
#: overlay colours of LV, MYO, RV
_COLOURS = ListedColormap([(0, 0, 0, 0), (0.9, 0.2, 0.2, 0.5), (0.2, 0.8, 0.2, 0.5), (0.2, 0.4, 1.0, 0.5)])


def example_slice(gt: np.ndarray, pred: np.ndarray) -> int:
    """Index along z of the slice with the most ground-truth foreground within the middle third of the slices
    that hold any (the prediction when the truth is empty; the middle slice when both are)."""
    fg = np.count_nonzero(gt > 0, axis=(0, 1))
    if not fg.any():
        fg = np.count_nonzero(pred > 0, axis=(0, 1))
    if not fg.any():
        return gt.shape[2] // 2
    idx = np.flatnonzero(fg)
    lo, hi = int(idx[0]), int(idx[-1])
    third = (hi - lo + 1) // 3
    a, b = lo + third, hi - third
    return a + int(np.argmax(fg[a:b + 1]))


@dataclass
class _Candidate:
    dice: float
    example: dict[str, Any]


class ExampleCollector:
    """Keeps, per group (the per-case column ``key``: ``Vendor``, or ``Centre`` with ``data.group_by: centre``), the
    3-D cases with the best and the worst mean Dice, as one 2-D slice each.

    Call :meth:`add` for every evaluated volume (row: its per-case row; image, gt, pred: (X, Y, Z) arrays in
    native geometry), then :meth:`examples` or :meth:`save`. Memory: two slices per group.
    """

    def __init__(self, key: str = "Vendor") -> None:
        self.key = key
        self._best: dict[str, _Candidate] = {}
        self._worst: dict[str, _Candidate] = {}

    def add(self, row: Mapping[str, Any], image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> None:
        group, d = str(row[self.key]), mean_dice(row)
        best, worst = self._best.get(group), self._worst.get(group)
        if best is not None and worst is not None and worst.dice <= d <= best.dice:
            return
        z = example_slice(gt, pred)
        ex = {"image": np.asarray(image[:, :, z], dtype=np.float32), "gt": np.asarray(gt[:, :, z], dtype=np.uint8),
              "pred": np.asarray(pred[:, :, z], dtype=np.uint8), "vendor": str(row.get("Vendor", "")),
              "group": group, "name": str(row.get("Name", "")), "phase": str(row.get("ED/ES", "")), "dice": d,
              "slice": z}
        if best is None or d > best.dice:
            self._best[group] = _Candidate(d, ex)
        if worst is None or d < worst.dice:
            self._worst[group] = _Candidate(d, ex)

    def examples(self) -> list[dict[str, Any]]:
        """Best then worst example of each group (sorted); one example when a group has a single case."""
        out = []
        for group in sorted(self._best, key=lambda g: (len(g), g)):
            pairs = [("best", self._best[group])]
            if self._worst[group].example is not self._best[group].example:
                pairs.append(("worst", self._worst[group]))
            for kind, cand in pairs:
                ex = dict(cand.example, kind=kind)
                case = ex["name"] if ex["name"].endswith(ex["phase"]) else f"{ex['name']} {ex['phase']}"
                ex["caption"] = (f"{self.key.lower()} {group_name(group, self.key)}, {kind}: {case}, mean Dice "
                                 f"{ex['dice']:.3f}, slice {ex['slice']}")
                out.append(ex)
        return out

    def save(self, path: str | Path) -> None:
        save_examples(path, self.examples())


def save_examples(path: str | Path, examples: Sequence[Mapping[str, Any]]) -> None:
    """Write ``examples`` (dicts with ``image``, ``gt``, ``pred`` 2-D arrays and ``caption``; optional ``vendor``,
    ``kind``, ``name``, ``phase``, ``dice``, ``slice``) in the layout of the module docstring, atomically."""
    arrays: dict[str, np.ndarray] = {}
    for i, ex in enumerate(examples):
        if not (np.ndim(ex["image"]) == np.ndim(ex["gt"]) == np.ndim(ex["pred"]) == 2):
            raise ValueError(f"example {i}: image, gt and pred must be 2-D slices")
        arrays[f"image_{i}"] = np.asarray(ex["image"], dtype=np.float32)
        arrays[f"gt_{i}"] = np.asarray(ex["gt"], dtype=np.uint8)
        arrays[f"pred_{i}"] = np.asarray(ex["pred"], dtype=np.uint8)
    for f in _STR_FIELDS:
        arrays[f] = np.array([str(ex.get(f, "")) for ex in examples], dtype=np.str_)
    arrays["dice"] = np.array([float(ex.get("dice", math.nan)) for ex in examples], dtype=np.float64)
    arrays["slice"] = np.array([int(ex.get("slice", -1)) for ex in examples], dtype=np.int64)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_examples(path: str | Path) -> list[dict[str, Any]]:
    """Inverse of :func:`save_examples`."""
    with np.load(path, allow_pickle=False) as z:
        n = len(z["caption"])
        return [{"image": z[f"image_{i}"], "gt": z[f"gt_{i}"], "pred": z[f"pred_{i}"],
                 **{f: str(z[f][i]) if f in z.files else "" for f in _STR_FIELDS}, "dice": float(z["dice"][i]),
                 "slice": int(z["slice"][i])}
                for i in range(n)]


def examples_figure(examples: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One PNG: a row per example (its caption above), columns image, ground truth and prediction overlaid."""
    fig = Figure(figsize=(9, 3.0 * len(examples)))
    for ex, sub in zip(examples, fig.subfigures(len(examples), 1, squeeze=False)[:, 0]):
        sub.suptitle(ex["caption"], fontsize=9)
        img = np.asarray(ex["image"], dtype=np.float64).T
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0.0, 1.0)
        for ax, (title, lab) in zip(sub.subplots(1, 3), [("image", None), ("ground truth", ex["gt"]),
                                                          ("prediction", ex["pred"])]):
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
            if lab is not None:
                ax.imshow(np.asarray(lab).T, cmap=_COLOURS, vmin=0, vmax=3, interpolation="nearest")
            ax.set_axis_off()
            ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=90, bbox_inches="tight")
