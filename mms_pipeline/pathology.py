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
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

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

    def fit(self, x: np.ndarray, y: Sequence[int]) -> "IndexClassifier":
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
