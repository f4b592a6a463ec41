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
