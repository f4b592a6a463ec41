"""The quickstart's judgement of a scored archive against the synthetic truth, on known values."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from msc_ray import quickstart


def _box(x1, y1, x2, y2, score=0.9):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score}


def test_heldout_metrics_on_a_known_archive():
    truth = pa.Table.from_pylist(
        [
            {"image": "sstack/1/S1_d01_c.png", "class": "1", "confluence": 0.30, "boxes": [[10, 10, 30, 30]]},
            {"image": "sstack/2/S1_d02_c.png", "class": "2", "confluence": 0.50, "boxes": []},
            {"image": "sstack/3/S2_d01_c.png", "class": "3", "confluence": 0.70, "boxes": [[0, 0, 20, 20]]},
            {"image": "sstack/4/S2_d02_c.png", "class": "4", "confluence": 0.90, "boxes": []},
        ]
    )
    p = [0.7, 0.1, 0.1, 0.1]
    report = pa.Table.from_pylist(
        [
            # right band, 2 points off, its abnormal cell found
            {"key": "sstack/S1_d01_c.png", "status": "ok", "predicted_class": "1", "probabilities": p,
             "confluence_pct": 32.0, "abnormal_boxes": [_box(10, 10, 30, 30)]},
            # wrong band (40-60 % predicted as 60-80 %), 12 points off, a box where there is no cell
            {"key": "sstack/S1_d02_c.png", "status": "ok", "predicted_class": "3", "probabilities": p,
             "confluence_pct": 62.0, "abnormal_boxes": [_box(50, 50, 60, 60)]},
            # right band, exact, its cell missed
            {"key": "sstack/S2_d01_c.png", "status": "ok", "predicted_class": "3", "probabilities": p,
             "confluence_pct": 70.0, "abnormal_boxes": []},
            # right band, 4 points off, nothing to find and nothing found
            {"key": "sstack/S2_d02_c.png", "status": "ok", "predicted_class": "4", "probabilities": p,
             "confluence_pct": 86.0, "abnormal_boxes": []},
            # an error row is not judged
            {"key": "sstack/S9_d01_c.png", "status": "error", "predicted_class": None, "probabilities": None,
             "confluence_pct": None, "abnormal_boxes": None},
        ]
    )  # fmt: skip
    h = quickstart.heldout_metrics(report, truth)
    assert h["images"] == 4
    assert h["band_accuracy"] == pytest.approx(0.75)
    assert h["confusion"] == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert h["confluence_mae_points"] == pytest.approx((2 + 12 + 0 + 4) / 4)
    assert h["abnormal_cells"] == 2
    assert h["abnormal_box_hit_rate"] == pytest.approx(0.5)  # 1 of 2 cells
    assert h["abnormal_box_fdr"] == pytest.approx(0.5)  # 1 of 2 boxes
    assert h["abnormal_image_hit_rate"] == pytest.approx(0.5)
    assert h["abnormal_image_fdr"] == pytest.approx(0.5)


def test_heldout_metrics_fdr_is_undefined_when_nothing_is_predicted():
    truth = pa.Table.from_pylist([{"image": "a/1/x.png", "class": "1", "confluence": 0.2, "boxes": [[0, 0, 9, 9]]}])
    report = pa.Table.from_pylist(
        [{"key": "x.png", "status": "ok", "predicted_class": "1", "probabilities": [1.0, 0, 0, 0],
          "confluence_pct": 20.0, "abnormal_boxes": []}]
    )  # fmt: skip
    h = quickstart.heldout_metrics(report, truth)
    assert h["abnormal_box_hit_rate"] == 0.0 and math.isnan(h["abnormal_box_fdr"])
    assert "n/a" in quickstart.heldout_lines({**h, "minutes": 1.0})[3]


def test_morphology_and_potency_judged_per_image_and_per_vessel_day():
    truth = pa.Table.from_pylist(
        [
            {"image": "sstack/1/S1_d01_a.png", "cell_count": 10, "confluence": 0.30, "vessel": "S1", "day": 1,
             "potency": 50.0},
            {"image": "sstack/1/S1_d01_b.png", "cell_count": 20, "confluence": 0.50, "vessel": "S1", "day": 1,
             "potency": 50.0},
            {"image": "sstack/2/S2_d01_a.png", "cell_count": 40, "confluence": 0.90, "vessel": "S2", "day": 1,
             "potency": 60.0},
            {"image": "sstack/3/S3_d02_a.png", "cell_count": 5, "confluence": 0.10, "vessel": "S3", "day": 2,
             "potency": 40.0},
        ]
    )  # fmt: skip
    report = pa.Table.from_pylist(
        [
            {"key": "sstack/S1_d01_a.png", "status": "ok", "cell_count": 12, "mask_confluence_pct": 35.0},
            {"key": "sstack/S1_d01_b.png", "status": "ok", "cell_count": 20, "mask_confluence_pct": 50.0},
            {"key": "sstack/S2_d01_a.png", "status": "ok", "cell_count": 30, "mask_confluence_pct": 80.0},
            {"key": "sstack/S3_d02_a.png", "status": "error", "cell_count": None, "mask_confluence_pct": None},
        ]
    )
    potency = pa.Table.from_pylist(
        [{"vessel": "S1", "day": 1, "potency": 52.0}, {"vessel": "S2", "day": 1, "potency": 58.0},
         {"vessel": "S3", "day": 2, "potency": 41.0}]
    )  # fmt: skip
    h = quickstart.morphology_metrics(report, potency, truth)
    assert h["segmented_images"] == 3
    assert h["cell_count_error"] == pytest.approx((0.2 + 0 + 0.25) / 3)
    assert h["mask_confluence_mae_points"] == pytest.approx((5 + 0 + 10) / 3)
    assert h["potency_vessel_days"] == 3 and h["potency_mae"] == pytest.approx((2 + 2 + 1) / 3)
    assert h["potency_spearman"] == pytest.approx(1.0)
    assert h["potency_r2"] == pytest.approx(1 - (4 + 4 + 1) / (0**2 + 10**2 + 10**2), rel=1e-6)
    base = {"images": 3, "band_accuracy": 1.0, "confusion": [], "confluence_mae_points": 0.0, "ece": 0.0,
            "abnormal_cells": 0, "abnormal_box_hit_rate": 1.0, "abnormal_box_fdr": 0.0, "abnormal_image_hit_rate": 1.0,
            "abnormal_image_fdr": 0.0}  # fmt: skip
    lines = quickstart.heldout_lines({**base, **h})
    expect = "  potency (3 vessel-days) from the segmenter's masks: R² 0.955"
    assert any(line.startswith(expect) for line in lines), lines
