"""Pathology from the clinical indices of a segmentation (``model.cls_head: indices``), as a cardiologist reads it.

A subject's pathology (NOR, DCM, HCM, other, ...) is decided from what its ED and ES segmentations measure: LV and
RV end-diastolic and end-systolic volumes and ejection fractions, LV mass, and two ratios that carry wall thickness
and RV dilation (LV mass / LV EDV, RV EDV / LV EDV). The classifier is linear discriminant analysis with a shrunk
shared covariance (features standardised on the training subjects; class priors from their frequencies), fitted
once on the **true** indices of the training subjects (their ground-truth masks), and applied to the indices of the
**predicted** masks at evaluation. So the pathology accuracy of a model measures how well its segmentation supports
the diagnosis, per vendor: a segmentation that shrinks the myocardium of a minority vendor's hearts misreads their
HCM there. The network itself has no classification head (the encoder-pooled head memorised the training subjects:
training accuracy 1.00, validation at chance).

:class:`Pathology` holds a run's classes (``data.classes``, ``data.class_map``) and decides a subject's pathology from a
model's outputs: from a network head's slice probabilities (``model.cls_head`` encoder or morphology), or from the
clinical indices of its predicted masks with the :class:`IndexClassifier` (``indices``).
"""
from __future__ import annotations

import math
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from groupdistil.errors import UserError

from . import data, scoring
from .metrics import clinical_indices

#: the class that takes every pathology code not mapped to another class (when it is one of ``data.classes``)
OTHER = "other"

#: clinical indices used (keys of :func:`mms_pipeline.metrics.clinical_indices`), then the two ratios
INDICES = ("LV EDV", "LV ESV", "LV EF", "RV EDV", "RV ESV", "RV EF", "LV mass")
FEATURES = INDICES + ("LV mass / LV EDV", "RV EDV / LV EDV")


def features(indices: Mapping[str, float]) -> np.ndarray:
    """The feature vector ``(len(FEATURES),)`` of one subject's indices (NaN where an index is undefined, e.g. the
    EF of an empty prediction)."""
    v = [float(indices[k]) for k in INDICES]
    lv_edv, rv_edv, mass = float(indices["LV EDV"]), float(indices["RV EDV"]), float(indices["LV mass"])
    v.append(mass / lv_edv if lv_edv > 0 else math.nan)
    v.append(rv_edv / lv_edv if lv_edv > 0 else math.nan)
    return np.asarray(v, dtype=np.float64)


class IndexClassifier:
    """Shrinkage LDA on standardised features: ``fit(X, y)`` then ``predict_proba(X)``.

    With ``Z = (X - mean) / std`` (training statistics), class means ``m_k`` of ``Z``, the pooled within-class
    covariance ``S`` shrunk towards the identity, ``S' = (1 - shrinkage) S + shrinkage I``, and priors ``pi_k``:
    ``score_k(z) = z' S'^-1 m_k - m_k' S'^-1 m_k / 2 + log pi_k``, softmax over classes. A NaN feature is replaced by
    the training mean (z = 0: it then says nothing). A class without training subjects gets probability 0.
    """

    def __init__(self, n_classes: int, shrinkage: float = 0.1) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
        self.n_classes, self.shrinkage = int(n_classes), float(shrinkage)

    def fit(self, x: np.ndarray, y: Sequence[int]) -> IndexClassifier:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)
        if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
            raise ValueError("fit needs X (n, d) and y (n,) with n >= 2")
        if not np.isfinite(x).all():
            raise ValueError("the training features must be finite (every training subject needs LV and RV volumes)")
        self.mean, self.std = x.mean(0), x.std(0)
        self.std[self.std == 0] = 1.0
        z = (x - self.mean) / self.std
        counts = np.bincount(y, minlength=self.n_classes)
        self.present = counts > 0
        self.means = np.stack([z[y == k].mean(0) if counts[k] else np.zeros(z.shape[1]) for k in range(self.n_classes)])
        resid = z - self.means[y]
        cov = resid.T @ resid / len(z)
        cov = (1.0 - self.shrinkage) * cov + self.shrinkage * np.eye(len(cov))
        self.precision = np.linalg.inv(cov)
        self.log_prior = np.log(np.where(self.present, counts / counts.sum(), 1.0))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``(n, d)`` or ``(d,)`` features -> ``(n, K)`` probabilities."""
        z = (np.atleast_2d(np.asarray(x, dtype=np.float64)) - self.mean) / self.std
        z = np.where(np.isfinite(z), z, 0.0)
        pm = self.means @ self.precision  # (K, d)
        scores = z @ pm.T - 0.5 * np.einsum("kd,kd->k", pm, self.means) + self.log_prior
        scores = np.where(self.present, scores, -np.inf)
        scores -= scores.max(1, keepdims=True)
        p = np.exp(scores)
        return p / p.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(1)


class Pathology:
    """The pathology classes of a run and how a model's decision is scored.

    ``classes``: ``data.classes``; ``class_map``: ``data.class_map`` (pathology code -> class, case-insensitive;
    unmapped codes go to :data:`OTHER` when it is a class); ``csv_path``: the metadata CSV (named in errors);
    ``cls_head``: ``model.cls_head``, or None when the run does not classify (``model.classify: false``); ``train``:
    the training subjects, asked for when the :class:`IndexClassifier` is first needed (``indices``).
    """

    def __init__(self, classes: Sequence[str], class_map: Mapping[str, str] | None, csv_path: Path,
                 cls_head: str | None, train: Callable[[], Sequence[data.Subject]]) -> None:
        self.classes = list(classes)
        self.class_map = {str(k).lower(): str(v).lower() for k, v in (class_map or {}).items()}
        self.csv_path, self.cls_head, self._train = csv_path, cls_head, train

    @property
    def by_indices(self) -> bool:
        """Decided from the clinical indices of the predicted masks (``model.cls_head: indices``)."""
        return self.cls_head == "indices"

    def class_index(self, subject: data.Subject) -> int:
        """Index in ``classes`` of the subject's pathology (``class_map`` first, then :data:`OTHER`)."""
        if subject.pathology is None:
            raise UserError(f"subject {subject.code}: {self.csv_path} has no 'Pathology' column (older release?); "
                            "set model.classify: false")
        if not subject.pathology:
            raise UserError(f"subject {subject.code}: {self.csv_path}: the subject's 'Pathology' cell is empty; "
                            "fill it in, or set model.classify: false")
        lower = [str(c).lower() for c in self.classes]
        name = self.class_map.get(subject.pathology.lower(), subject.pathology.lower())
        if name not in lower:
            name = OTHER
        if name not in lower:
            raise UserError(f"subject {subject.code}: {self.csv_path}: pathology '{subject.pathology}' is not in "
                            f"data.classes {self.classes} and there is no '{OTHER}' class (see data.class_map)")
        return lower.index(name)

    @cached_property
    def index_classifier(self) -> IndexClassifier:
        """The :class:`IndexClassifier` fitted on the true clinical indices (ground-truth masks) of the training
        subjects."""
        x, y = [], []
        for s in self._train():
            gts, spacing = scoring.native_truth(s, data.load_volumes(s))
            f = features(clinical_indices(gts["ED"], gts["ES"], gts["ED"], gts["ES"], spacing, spacing))
            if not np.isfinite(f).all():
                raise UserError(f"subject {s.code}: its ground truth has an empty LV or RV at ED, so the pathology "
                                f"classifier (model.cls_head: indices) cannot use it; set model.cls_head or "
                                f"model.classify: false")
            x.append(f)
            y.append(self.class_index(s))
        return IndexClassifier(len(self.classes)).fit(np.stack(x), y)

    def classify_rows(self, subject: data.Subject, rows: list[dict[str, Any]],
                      probs: torch.Tensor | None = None) -> None:
        """Add ``cls_correct``, ``Pathology`` and ``cls_pred`` to the subject's ED row (``rows[0]``): from the slice
        probabilities ``probs (Z, K)`` of a network head, or (``indices``) from the row's clinical indices; nothing
        when the run does not classify."""
        if probs is not None:
            predicted = int(probs.mean(0).argmax())
        elif self.by_indices:
            predicted = int(self.index_classifier.predict(features(rows[0]))[0])
        else:
            return
        rows[0].update({"cls_correct": float(predicted == self.class_index(subject)), "Pathology": subject.pathology,
                        "cls_pred": self.classes[predicted]})
