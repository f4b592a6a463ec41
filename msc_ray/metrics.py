"""Evaluation: micro one-vs-rest ROC-AUC and PR-AUC, accuracy, confusion, calibration (ECE and
temperature scaling), and the detector's hit rate / false discovery rate."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from . import BAND_EDGES


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample SD (ddof=1) over folds, NaNs left out; SD 0 for one value, NaN for none."""
    v = [float(x) for x in values if not np.isnan(x)]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)


def write_csv(rows: list[dict], path) -> str:
    """Rows of one table (same keys) → a CSV file with a header; returns the path."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def fmt(v: float | None) -> str:
    """A table figure: three decimals, ``n/a`` for an undefined one (never 0)."""
    return "n/a" if v is None or np.isnan(v) else f"{v:.3f}"


def fold_table_md(rows: list[dict], lead: list[str], keys: tuple[str, ...], summary: dict, head: str) -> list[str]:
    """A per-fold Markdown table: ``head`` is the header row (its cells: the ``lead`` columns, then one
    per key); each row gives its ``lead`` values, then its ``keys`` figures; a last row gives mean ± SD
    (``summary[key] = (mean, sd)``)."""
    n = head.count("|") - 1
    md = [head, "|" + "---|" * n]
    for r in rows:
        md.append("| " + " | ".join([str(r[c]) for c in lead] + [fmt(r[k]) for k in keys]) + " |")
    figures = ["n/a" if np.isnan(summary[k][0]) else f"{summary[k][0]:.3f} ± {summary[k][1]:.3f}" for k in keys]
    md.append("| " + " | ".join(["mean ± SD"] + [""] * (len(lead) - 1) + figures) + " |")
    return md


def one_hot(y: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.float64)[np.asarray(y, int)]


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict:
    """``y`` (N,) class indices, ``probs`` (N, K) → micro ROC-AUC, micro PR-AUC, accuracy, confusion.

    Micro averaging flattens the one-vs-rest problems into one, so it is defined whenever N ≥ 1 and
    K ≥ 2, even when a validation fold lacks a class."""
    y = np.asarray(y, int)
    k = probs.shape[1]
    yy = one_hot(y, k)
    return {
        "roc_auc": float(roc_auc_score(yy.ravel(), probs.ravel())),
        "pr_auc": float(average_precision_score(yy.ravel(), probs.ravel())),
        "accuracy": float(accuracy_score(y, probs.argmax(1))),
        "confusion": confusion_matrix(y, probs.argmax(1), labels=list(range(k))).tolist(),
    }


def per_class_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[dict]:
    """Per class: precision, recall, F1 and support (scikit-learn), and one-vs-rest ROC-AUC (NaN for a
    class that is absent, or the only one present)."""
    y = np.asarray(y, int)
    k = len(classes)
    p, r, f, s = precision_recall_fscore_support(y, probs.argmax(1), labels=list(range(k)), zero_division=0)
    out = []
    for j, name in enumerate(classes):
        pos = y == j
        auc = float(roc_auc_score(pos, probs[:, j])) if 0 < pos.sum() < len(y) else float("nan")
        out.append(
            {
                "class": name,
                "precision": float(p[j]),
                "recall": float(r[j]),
                "f1": float(f[j]),
                "support": int(s[j]),
                "roc_auc": auc,
            }
        )
    return out


def confluence_in_band(probs: np.ndarray, regressed: np.ndarray | None = None) -> np.ndarray:
    """Confluence % per image that always lies inside the predicted band (argmax of ``probs``).

    With a regression output (``regressed``, fractions in [0, 1]) it is that value clipped to the
    band. Without one it is order-aware: the band's midpoint moved towards the neighbour band that
    holds more probability, ``lo + (hi - lo) · (0.5 + 0.5 · (P(above) − P(below)))``, which stays in
    [lo, hi] because P(above) and P(below) are each in [0, 1]. Bands are :data:`BAND_EDGES`."""
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    if k != len(BAND_EDGES) - 1:
        raise ValueError(f"confluence needs the {len(BAND_EDGES) - 1} confluence bands, got {k} classes")
    c = probs.argmax(1)
    lo, hi = np.asarray(BAND_EDGES[:-1])[c], np.asarray(BAND_EDGES[1:])[c]
    if regressed is not None:
        value = np.clip(np.asarray(regressed, np.float64), lo, hi)
    else:
        cum = np.cumsum(probs, axis=1)
        below = np.where(c > 0, cum[np.arange(len(c)), np.maximum(c - 1, 0)], 0.0)
        above = 1.0 - cum[np.arange(len(c)), c]
        value = lo + (hi - lo) * (0.5 + 0.5 * (above - below))
    return 100.0 * value


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE over equal-width confidence bins of the top class."""
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def ece_floor(probs: np.ndarray, bins: int = 15, draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would show on this many images: the mean ECE when each
    image's label is drawn from its own predicted probabilities. ECE is biased upwards on small sets
    (on 120 images of a well-separated 4-band model about 0.06), so a measured ECE reads against this."""
    probs = np.asarray(probs, np.float64)
    if len(probs) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, axis=1)
    cum[:, -1] = 1.0
    labels = (rng.random((draws, len(probs), 1)) > cum[None]).sum(-1)
    return float(np.mean([expected_calibration_error(y, probs, bins) for y in labels]))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (a 1-D bounded search)."""
    y = np.asarray(y, int)
    logits = np.asarray(logits, np.float64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def calibrated(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of ``[x1, y1, x2, y2]`` boxes, (A, 4) × (B, 4) → (A, B)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def match_detections(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """Greedy matching by descending score: for each prediction, True when it takes a still unmatched
    truth box with IoU ≥ ``iou`` (a true positive), False otherwise (a false positive)."""
    order = np.argsort(-np.asarray(scores))
    tp = np.zeros(len(order), bool)
    if len(truth) == 0 or len(order) == 0:
        return tp
    ious = box_iou(np.asarray(pred)[order], truth)
    taken = np.zeros(len(truth), bool)
    for i in range(len(order)):
        cand = np.where(~taken & (ious[i] >= iou))[0]
        if len(cand):
            j = cand[np.argmax(ious[i, cand])]
            taken[j] = True
            tp[i] = True
    out = np.zeros(len(order), bool)
    out[order] = tp
    return out


def detection_metrics(
    preds: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], score_threshold: float, iou: float = 0.5
) -> dict:
    """Hit rate and false discovery rate, per box and per image, at ``score_threshold`` and IoU ≥ ``iou``.

    Per box: TP = predicted box matched to a truth box (one-to-one), FP = unmatched prediction,
    FN = unmatched truth box. Per image: an image with abnormal cells is a TP when at least one of its
    cells is matched and an FN otherwise; an image with a prediction but no matched cell is an FP.
    hit rate = TP / (TP + FN), FDR = FP / (TP + FP). A ratio whose denominator is 0 is undefined and
    returned as NaN (FDR where nothing was predicted; hit rate where there was nothing to find): never 0."""
    tp = fp = fn = itp = ifp = ifn = 0
    for (boxes, scores), truth in zip(preds, truths, strict=True):
        keep = scores >= score_threshold
        m = match_detections(boxes[keep], scores[keep], truth, iou)
        tp += int(m.sum())
        fp += int((~m).sum())
        fn += len(truth) - int(m.sum())
        if m.any():
            itp += 1
        elif len(truth):
            ifn += 1
        if keep.any() and not m.any():
            ifp += 1

    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "hit_rate": ratio(tp, tp + fn),
        "fdr": ratio(fp, tp + fp),
        "image_hit_rate": ratio(itp, itp + ifn),
        "image_fdr": ratio(ifp, itp + ifp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def average_precision(preds: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], iou: float = 0.5) -> float:
    """VOC-style AP at IoU ≥ ``iou`` (all-point interpolation) over every prediction of every image."""
    scores, hits = [], []
    n_truth = sum(len(t) for t in truths)
    for (boxes, sc), truth in zip(preds, truths, strict=True):
        hits.append(match_detections(boxes, sc, truth, iou))
        scores.append(np.asarray(sc))
    if n_truth == 0:
        return float("nan")
    if not scores or sum(len(s) for s in scores) == 0:
        return 0.0
    s, h = np.concatenate(scores), np.concatenate(hits)
    order = np.argsort(-s)
    h = h[order]
    ctp, cfp = np.cumsum(h), np.cumsum(~h)
    recall = ctp / n_truth
    precision = ctp / np.maximum(ctp + cfp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
