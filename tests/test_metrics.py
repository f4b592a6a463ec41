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
    one_class = np.array([0, 0])
    expected = roc_auc_score(np.eye(3)[one_class].ravel(), p[:2].ravel())
    assert metrics.classification_metrics(one_class, p[:2])["roc_auc"] == pytest.approx(expected)


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


def test_ece_floor_is_what_a_calibrated_model_shows_on_that_many_images():
    """Labels drawn from the model's own probabilities: calibrated by construction, yet ECE on 120
    images is far from 0; on 20,000 it nearly is. The floor predicts the small-set figure."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2.0, (20000, 4))
    probs = metrics.calibrated(logits)
    y = (rng.random((20000, 1)) > np.cumsum(probs, 1)).sum(1)
    small = [metrics.expected_calibration_error(y[i : i + 120], probs[i : i + 120]) for i in range(0, 12000, 120)]
    floor = metrics.ece_floor(probs[:120])
    assert 0.04 < np.mean(small) < 0.12 and floor == pytest.approx(np.mean(small), rel=0.3)
    assert metrics.expected_calibration_error(y, probs) < 0.015 and metrics.ece_floor(probs[:5000], draws=20) < 0.02
    # an overconfident model's ECE stands well above its floor
    over = metrics.calibrated(logits[:120] * 4)
    assert metrics.expected_calibration_error(y[:120], over) > 2 * metrics.ece_floor(over)
    assert np.isnan(metrics.ece_floor(np.zeros((0, 4))))


def test_box_iou():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert np.allclose(metrics.box_iou(a, b), [[1.0, 1 / 3, 0.0]])


def test_mean_sd_over_folds():
    assert metrics.mean_sd([0.8, 0.9, float("nan"), 1.0]) == pytest.approx((0.9, 0.1))
    assert metrics.mean_sd([0.7]) == (0.7, 0.0)
    assert all(np.isnan(metrics.mean_sd([])))


def test_confluence_in_band_known_values():
    # regression clipped to the predicted band
    p = np.array([[0.1, 0.7, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.0, 0.0, 0.2, 0.8]])
    assert metrics.confluence_in_band(p, np.array([0.55, 0.75, 0.85])) == pytest.approx([55.0, 60.0, 85.0])
    # order-aware without regression: midpoint moved towards the heavier neighbour
    q = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.6, 0.4, 0.0], [0.3, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert metrics.confluence_in_band(q) == pytest.approx([50.0, 54.0, 47.0, 20.0])
    with pytest.raises(ValueError, match="4 confluence bands"):
        metrics.confluence_in_band(np.ones((1, 3)) / 3)


def test_per_class_metrics_known_values():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    a, b = metrics.per_class_metrics(y, p, ["neg", "pos"])
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 0.5, 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["f1"] == pytest.approx(0.8)
    assert b["roc_auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))


def test_undefined_detection_ratios_are_nan_never_zero():
    truth = [np.array([[0, 0, 10, 10]], float), np.zeros((0, 4))]
    nothing = [(np.zeros((0, 4)), np.zeros(0)), (np.zeros((0, 4)), np.zeros(0))]
    m = metrics.detection_metrics(nothing, truth, 0.5)
    assert m["hit_rate"] == 0.0 and np.isnan(m["fdr"]) and np.isnan(m["image_fdr"])
    none_to_find = metrics.detection_metrics(nothing[1:], truth[1:], 0.5)
    assert np.isnan(none_to_find["hit_rate"]) and np.isnan(none_to_find["fdr"])
    assert metrics.mean_sd([0.1, float("nan"), 0.3]) == pytest.approx((0.2, 0.1414213), abs=1e-6)
