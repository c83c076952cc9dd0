"""Teachers given as their saved class probabilities (``--teacher FOLDER`` or a ``.csv`` / ``.npz`` file): how
they are recognised, identified by content, and checked. A pipeline reads the files
(:meth:`~groupdistil.pipeline.Pipeline.teacher_targets`); :mod:`groupdistil.teacher` distils them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

#: smallest probability before the logarithm: ``log(PROB_FLOOR)`` (about -13.8) stands for ``log 0`` (a one-hot
#: target), finite, and exact enough in float16
PROB_FLOOR = 1e-6
#: largest distance from 1 of the sum of a position's saved probabilities over the classes (float16 storage of the
#: files, interpolation)
PROB_SUM_ATOL = 1e-2


def is_probabilities_source(path: str | Path) -> bool:
    """True when ``--teacher PATH`` names saved probabilities rather than a model: a folder that is not a run folder
    (neither ``config.yaml`` nor ``checkpoints/`` in it), or a ``.csv`` / ``.npz`` file."""
    p = Path(path)
    if p.is_dir():
        return not ((p / "config.yaml").exists() or (p / "checkpoints").exists())
    return p.is_file() and p.suffix.lower() in (".csv", ".npz")


def probabilities_identity(path: str | Path) -> str:
    """``probabilities-<16 hex>``: a SHA-256 over the relative path and content of every file of the folder (hidden
    ones excepted; nothing is parsed), or of the file: what a run records as its teacher, so that changed files are
    never taken for the same teacher."""
    p = Path(path)
    digest = hashlib.sha256()
    files = [p] if p.is_file() else sorted(
        Path(d) / f for d, dirs, names in os.walk(p) for f in names
        if not f.startswith(".") and not any(part.startswith(".") for part in Path(d).relative_to(p).parts))
    for f in files:
        digest.update(f"{f.relative_to(p).as_posix() if f != p else f.name}\n".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return f"probabilities-{digest.hexdigest()[:16]}"


def probabilities_problem(p: np.ndarray, axes: str = "", class_axis: int = 0) -> str:
    """Why ``p`` is not a probability distribution over ``class_axis`` at every position ("" when it is): every
    value finite and in [0, 1], each position's sum over the classes within ``PROB_SUM_ATOL`` of 1. The first bad
    position is named by its index, described by ``axes`` (e.g. ``"(class, z, y, x)"``)."""
    p = np.asarray(p)
    where = f" {axes}" if axes else ""
    finite = np.isfinite(p)
    if not finite.all():
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        return f"{int((~finite).sum())} non-finite probabilities (NaN/Inf), the first at{where} {first}"
    inside = (p >= 0) & (p <= 1)
    if not inside.all():
        first = tuple(int(i) for i in np.argwhere(~inside)[0])
        return (f"{int((~inside).sum())} values outside [0, 1] (min {float(p.min()):.4g}, max {float(p.max()):.4g}), "
                f"the first at{where} {first}")
    off = np.abs(p.sum(axis=class_axis, dtype=np.float64) - 1.0)
    if not (off <= PROB_SUM_ATOL).all():
        first = tuple(int(i) for i in np.argwhere(off > PROB_SUM_ATOL)[0])
        return (f"the probabilities do not sum to 1 over the classes (off by up to {float(off.max()):.3g}, tolerance "
                f"{PROB_SUM_ATOL:g}; the first such position without the class axis: {first})")
    return ""
