"""The scored archive against the synthetic truth of its images: the figures the quickstart prints."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def heldout_metrics(report_table, truth_table) -> dict:
    """The scored archive against the synthetic truth of its images (joined by file name): band
    accuracy and confusion, confluence MAE (points), and abnormal cells per box and per image at the
    detector's own operating point."""
    import numpy as np

    from .. import BAND_NAMES, metrics

    truth = {r["image"].rsplit("/", 1)[-1]: r for r in truth_table.to_pylist()}
    y, pred, err, preds, truths, probs = [], [], [], [], [], []
    for row in report_table.to_pylist():
        t = truth.get(row["key"].rsplit("/", 1)[-1])
        if row["status"] != "ok" or t is None:
            continue
        y.append(int(t["class"]) - 1)
        pred.append(BAND_NAMES.index(row["predicted_class"]))
        probs.append(row["probabilities"])
        err.append(abs(row["confluence_pct"] - 100 * t["confluence"]))
        boxes = row.get("abnormal_boxes") or []
        preds.append(
            (
                np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in boxes], np.float32).reshape(-1, 4),
                np.array([b["score"] for b in boxes], np.float32),
            )
        )
        truths.append(np.asarray(t["boxes"] or [], np.float32).reshape(-1, 4))
    from sklearn.metrics import accuracy_score, confusion_matrix

    det = metrics.detection_metrics(preds, truths, 0.0)  # the report holds boxes above the threshold only
    return {
        "images": len(y),
        "band_accuracy": float(accuracy_score(y, pred)),
        "confusion": confusion_matrix(y, pred, labels=list(range(len(BAND_NAMES)))).tolist(),
        "confluence_mae_points": float(np.mean(err)),
        "ece": metrics.expected_calibration_error(np.array(y), np.array(probs)),
        "ece_floor": metrics.ece_floor(np.array(probs)),  # a calibrated model's ECE on this many images
        "abnormal_box_hit_rate": det["hit_rate"],
        "abnormal_box_fdr": det["fdr"],
        "abnormal_image_hit_rate": det["image_hit_rate"],
        "abnormal_image_fdr": det["image_fdr"],
        "abnormal_cells": det["tp"] + det["fn"],
    }


def morphology_metrics(report_table, potency_table, truth_table) -> dict:
    """The segmenter's and potency model's part of the report against the truth: mean relative cell
    count error and mask-confluence MAE (points) per image; potency R², Spearman ρ and MAE per
    vessel-day (truth: the mean of the day's images, one value per vessel-day)."""
    import numpy as np

    truth = {r["image"].rsplit("/", 1)[-1]: r for r in truth_table.to_pylist()}
    count_err, conf_err = [], []
    for row in report_table.to_pylist():
        t = truth.get(row["key"].rsplit("/", 1)[-1])
        if row["status"] != "ok" or t is None or row.get("cell_count") is None:
            continue
        count_err.append(abs(row["cell_count"] - t["cell_count"]) / max(t["cell_count"], 1))
        conf_err.append(abs(row["mask_confluence_pct"] - 100 * t["confluence"]))
    out = {
        "segmented_images": len(count_err),
        "cell_count_error": float(np.mean(count_err)) if count_err else float("nan"),
        "mask_confluence_mae_points": float(np.mean(conf_err)) if conf_err else float("nan"),
    }
    if "potency" in truth_table.column_names:
        true = truth_table.to_pandas().groupby(["vessel", "day"], as_index=False)["potency"].mean()
        if potency_table is not None and len(potency_table):
            pred = potency_table.to_pandas() if hasattr(potency_table, "to_pandas") else potency_table
            out.update(_potency_scores(pred.merge(true, on=["vessel", "day"], suffixes=("", "_true")), "potency"))
    return out


def _potency_scores(both, prefix: str) -> dict:
    """Predicted vs true potency per vessel-day → ``{prefix}_vessel_days``, ``_r2``, ``_spearman``, ``_mae``."""
    from scipy.stats import spearmanr
    from sklearn.metrics import mean_absolute_error, r2_score

    if len(both) < 2:
        return {}
    y, p = both["potency_true"].to_numpy(), both["potency"].to_numpy()
    return {
        f"{prefix}_vessel_days": len(both),
        f"{prefix}_r2": float(r2_score(y, p)),
        f"{prefix}_spearman": float(spearmanr(y, p).statistic),
        f"{prefix}_mae": float(mean_absolute_error(y, p)),
    }


def judge(report_dir: Path, heldout: Path, out: Path, seed: int, started: float) -> Path:
    """Step 9: the report against the truth of the held-out images → heldout_metrics.json."""
    import json

    import pyarrow.parquet as pq

    from .. import score

    log.info("step 9/9: the archive against the truth of its images (new vessels, seed %d)", seed)
    truth = pq.read_table(heldout / "truth.parquet")
    report_rows = score.read_report(str(report_dir))
    held = heldout_metrics(report_rows, truth)
    held.update(morphology_metrics(report_rows, score.read_potency(str(report_dir)), truth))
    held["minutes"] = (time.perf_counter() - started) / 60
    path = out / "heldout_metrics.json"
    path.write_text(json.dumps(held, indent=2) + "\n")
    for line in heldout_lines(held):
        log.info("%s", line)
    log.info("quickstart took %.1f minutes", held["minutes"])
    return path


def heldout_lines(h: dict) -> list[str]:
    def f(v):
        return "n/a" if v != v else f"{v:.3f}"

    lines = [
        f"on {h['images']} images of vessels no model saw:",
        f"  band accuracy {f(h['band_accuracy'])}; confusion (rows truth 1-4, columns predicted) {h['confusion']}",
        f"  confluence MAE {h['confluence_mae_points']:.1f} points; calibration error (ECE) {f(h['ece'])} "
        f"(a perfectly calibrated model would show {f(h.get('ece_floor', float('nan')))} on {h['images']} images)",
        f"  abnormal cells ({h['abnormal_cells']}): per box hit rate {f(h['abnormal_box_hit_rate'])}, FDR "
        f"{f(h['abnormal_box_fdr'])}; per image hit rate {f(h['abnormal_image_hit_rate'])}, FDR "
        f"{f(h['abnormal_image_fdr'])}",
    ]
    if h.get("segmented_images"):
        lines.append(
            f"  cells ({h['segmented_images']} images): count error {f(h['cell_count_error'])}, mask confluence "
            f"MAE {h['mask_confluence_mae_points']:.1f} points"
        )
    if "potency_r2" in h:
        lines.append(
            f"  potency ({h['potency_vessel_days']} vessel-days) from the segmenter's masks: R² {f(h['potency_r2'])}, "
            f"Spearman ρ {f(h['potency_spearman'])}, MAE {h['potency_mae']:.2f}"
        )
    return lines
