"""The four accuracy definitions against a hand computation."""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from waterbirds_pipeline.metadata import GROUP_NAMES
from waterbirds_pipeline.metrics import accuracy_summary, group_accuracy

TRAIN = (3498, 184, 56, 1057)
#            group 0: 3 / 4   group 1: 1 / 2  group 2: 0 / 2  group 3: 2 / 2
GROUP = np.array([0, 0, 0, 0, 1, 1, 2, 2, 3, 3])
Y = GROUP // 2
PRED = np.array([0, 0, 0, 1, 0, 1, 0, 0, 1, 1])


def test_group_accuracy() -> None:
    acc, n = group_accuracy(PRED == Y, GROUP, 4)
    assert_allclose(acc, [0.75, 0.5, 0.0, 1.0])
    np.testing.assert_array_equal(n, [4, 2, 2, 2])


def test_summary_by_hand() -> None:
    s = accuracy_summary(PRED, Y, GROUP, GROUP_NAMES, TRAIN)
    assert s["group_acc"] == {"landbird_land": 0.75, "landbird_water": 0.5, "waterbird_land": 0.0,
                              "waterbird_water": 1.0}
    assert s["group_n"] == {"landbird_land": 4, "landbird_water": 2, "waterbird_land": 2, "waterbird_water": 2}
    assert s["worst_group_acc"] == 0.0 and s["worst_group"] == "waterbird_land"
    assert_allclose(s["avg_acc"], 6 / 10)  # raw accuracy over the images
    assert_allclose(s["train_weighted_avg_acc"], (3498 * 0.75 + 184 * 0.5 + 56 * 0.0 + 1057 * 1.0) / 4795)
    assert_allclose(s["mean_group_acc"], (0.75 + 0.5 + 0.0 + 1.0) / 4)  # "adjusted accuracy"
    assert s["group_metric"] == s["group_acc"] and s["worst_group_metric"] == s["worst_group_acc"]
    assert s["average_metric"] == s["train_weighted_avg_acc"]
    # per class, from the labels alone (train.selection: worst_class): landbirds 4 / 6 right, waterbirds 2 / 4
    assert s["class_metric"] == {"landbird": pytest.approx(4 / 6), "waterbird": 0.5}


def test_absent_group_is_left_out() -> None:
    keep = GROUP != 2
    s = accuracy_summary(PRED[keep], Y[keep], GROUP[keep], GROUP_NAMES, TRAIN)
    assert s["group_acc"]["waterbird_land"] is None and s["group_n"]["waterbird_land"] == 0
    assert s["worst_group"] == "landbird_water" and s["worst_group_acc"] == 0.5
    assert_allclose(s["train_weighted_avg_acc"], (3498 * 0.75 + 184 * 0.5 + 1057 * 1.0) / (3498 + 184 + 1057))
    assert_allclose(s["mean_group_acc"], (0.75 + 0.5 + 1.0) / 3)


@pytest.mark.parametrize("pred, expected", [(np.zeros(10, int), 0.0), (Y, 1.0)])
def test_constant_and_perfect(pred: np.ndarray, expected: float) -> None:
    assert accuracy_summary(pred, Y, GROUP, GROUP_NAMES, TRAIN)["worst_group_acc"] == expected
