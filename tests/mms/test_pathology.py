"""Pathology from clinical indices (``model.cls_head: indices``): the features and the shrinkage LDA by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mms_pipeline.pathology import FEATURES, IndexClassifier, features


def test_features_of_known_indices() -> None:
    ind = {"LV EDV": 100.0, "LV ESV": 40.0, "LV EF": 60.0, "RV EDV": 120.0, "RV ESV": 60.0, "RV EF": 50.0,
           "LV mass": 150.0}
    f = features(ind)
    assert len(f) == len(FEATURES) == 9
    assert f.tolist() == [100.0, 40.0, 60.0, 120.0, 60.0, 50.0, 150.0, 1.5, 1.2]
    empty = features({**ind, "LV EDV": 0.0, "LV EF": math.nan})
    assert math.isnan(empty[2]) and math.isnan(empty[7]) and math.isnan(empty[8])


def test_lda_against_a_hand_computation() -> None:
    # two classes in 2-D: class means (0, 0) and (2, 0) in raw units; shrinkage 0: plain LDA
    x = np.array([[-1.0, -1.0], [1.0, 1.0], [1.0, 1.0], [3.0, -1.0]])
    y = [0, 0, 1, 1]
    clf = IndexClassifier(3, shrinkage=0.0).fit(x, y)
    # by hand: mean (1, 0), std (sqrt(2), 1); z-means m0 = (-1/sqrt2, 0), m1 = (1/sqrt2, 0); pooled covariance of
    # the residuals: diag(0.5, 1); priors 1/2 each
    m0, m1 = np.array([-1 / math.sqrt(2), 0.0]), np.array([1 / math.sqrt(2), 0.0])
    prec = np.diag([2.0, 1.0])
    z = (np.array([1.5, 0.3]) - np.array([1.0, 0.0])) / np.array([math.sqrt(2), 1.0])
    s = np.array([z @ prec @ m - 0.5 * m @ prec @ m for m in (m0, m1)])
    want = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    p = clf.predict_proba(np.array([1.5, 0.3]))[0]
    assert p[:2] == pytest.approx(want, rel=1e-12) and p[2] == 0.0  # a class without training subjects: 0
    assert clf.predict(np.array([[-1.0, 0.0], [3.0, 0.0]])).tolist() == [0, 1]
    # a NaN feature says nothing (z = 0): the other feature decides
    assert clf.predict_proba(np.array([math.nan, 0.3]))[0][:2] == pytest.approx([0.5, 0.5])


def test_shrinkage_keeps_a_singular_covariance_invertible_and_bad_input_is_refused() -> None:
    x = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0], [4.0, 8.0]])  # collinear features
    clf = IndexClassifier(2, shrinkage=0.1).fit(x, [0, 0, 1, 1])
    assert clf.predict(x).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="finite"):
        IndexClassifier(2).fit(np.array([[1.0, math.nan], [2.0, 1.0]]), [0, 1])
    with pytest.raises(ValueError, match="shrinkage"):
        IndexClassifier(2, shrinkage=2.0)


def test_per_class_accuracy_for_selection_by_worst_class(mms_root, make_pipeline) -> None:
    """With ``eval.metric: accuracy`` the summary's ``class_metric`` is each pathology class's share of subjects
    recognised (``train.selection: worst_class``)."""
    p = make_pipeline(mms_root, eval={"metric": "accuracy"})
    subjects = p.splits["test"]
    rows = []
    for i, s in enumerate(subjects):
        metrics = {f"Dice {k}": 1.0 for k in ("LV", "MYO", "RV")}
        rows += [{"Name": s.code, "ED/ES": "ED", "Vendor": s.vendor, "Centre": s.centre, **metrics,
                  "cls_correct": float(i % 2), "Pathology": s.pathology},
                 {"Name": s.code, "ED/ES": "ES", "Vendor": s.vendor, "Centre": s.centre, **metrics}]
    out = p.evaluation.summarise(rows)
    truth = [p.dcfg["classes"][p.pathology.class_index(s)] for s in subjects]
    want = {c: np.mean([i % 2 for i, t in enumerate(truth) if t == c]) for c in p.dcfg["classes"] if c in truth}
    assert out["class_metric"] == pytest.approx(want)
