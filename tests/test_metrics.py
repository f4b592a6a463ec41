from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from msc_ray import metrics


def test_micro_metrics_match_a_hand_computation():
    y = np.array([0, 1, 2, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]])
    m = metrics.classification_metrics(y, p)
    assert m["accuracy"] == 0.75
    assert m["roc_auc"] == pytest.approx(roc_auc_score(np.eye(3)[y].ravel(), p.ravel()))
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # defined even when the fold lacks a class
    assert 0 <= metrics.classification_metrics(np.array([0, 0]), p[:2])["roc_auc"] <= 1


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    clean = np.eye(4)[y] * 2.0 + rng.normal(0, 1.2, (2000, 4))
    over = clean * 4.0  # the same ranking, far too confident
    t = metrics.fit_temperature(over, y)
    assert 2.5 < t < 6.0
    before = metrics.expected_calibration_error(y, metrics.calibrated(over))
    after = metrics.expected_calibration_error(y, metrics.calibrated(over, t))
    assert after < before / 2


def test_box_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert np.allclose(metrics.box_iou(a, b), [[1.0, 1 / 3, 0.0]])


def test_mean_sd_over_folds():
    assert metrics.mean_sd([0.8, 0.9, float("nan"), 1.0]) == pytest.approx((0.9, 0.1))
    assert metrics.mean_sd([0.7]) == (0.7, 0.0)
    assert all(np.isnan(metrics.mean_sd([])))
