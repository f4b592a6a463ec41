"""Evaluation: micro one-vs-rest ROC-AUC and PR-AUC, accuracy, confusion, calibration (ECE and
temperature scaling), and the detector's hit rate / false discovery rate."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, roc_auc_score


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
