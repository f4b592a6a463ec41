"""A fold's best model on its inner validation part and its outer fold; the operating point (NMS
IoU, score threshold) chosen on the inner parts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import engine, metrics, storage
from .job import DetectJobConfig

NMS_CANDIDATES = (0.3, 0.4, 0.5)


@dataclass
class FoldResult:
    fold: int
    checkpoint: str
    epochs: int
    best_epoch: int
    best_val_map: float
    val_preds: list = field(default_factory=list)  # inner validation: the operating point is chosen here
    val_truths: list = field(default_factory=list)
    preds: list = field(default_factory=list)  # outer fold: [(boxes (k, 4), scores (k,))] per image
    truths: list = field(default_factory=list)  # [(m, 4)] per outer-fold image
    rows: list = field(default_factory=list)


def _device(job: DetectJobConfig) -> torch.device:
    return torch.device("cuda" if job.gpu and torch.cuda.is_available() else "cpu")


def _read_state(job: DetectJobConfig, ckpt_dir: str) -> dict:
    """A fold checkpoint's ``state.pt`` (a path in the run's storage: local, or ``bucket/key`` on S3)."""
    import io

    raw = storage.read_checkpoint_file(job.out, ckpt_dir, "state.pt", job.endpoint_url)
    if raw is None:
        raise FileNotFoundError(f"{ckpt_dir}: no state.pt in this checkpoint")
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def load_best(ckpt_dir: str, job: DetectJobConfig, **kwargs):
    """The best epoch's model of a fold checkpoint (``job.build_model`` with the checkpoint's anchors
    and ``kwargs``), in eval mode on the job's device, and the checkpoint's state."""
    state = _read_state(job, ckpt_dir)
    model = job.build_model(json.loads(state["anchors"]), **kwargs)
    model.load_state_dict(state["best_model"] or state["model"])
    return model.eval().to(_device(job)), state


def predict_fold(job: DetectJobConfig, fold: int, folds: int, ckpt_dir: str, cache) -> FoldResult:
    """The fold's best model on its inner validation part and on its outer fold."""
    _, val, test = cache.split(fold, folds)
    # a loose threshold and the loosest NMS, both tightened later at the operating point
    model, state = load_best(ckpt_dir, job, score_thresh=0.01, nms_thresh=max(NMS_CANDIDATES))
    aug = engine.Augmenter(job.data_config(), train=False, boxes=True)
    dev = _device(job)
    vp, vt = engine.predict_detections(model, val, aug, batch_size=job.batch_size * 2, device=dev)
    tp, tt = engine.predict_detections(model, test, aug, batch_size=job.batch_size * 2, device=dev)
    return FoldResult(
        fold=fold,
        checkpoint=ckpt_dir,
        epochs=int(state["epoch"]),
        best_epoch=int(state["best_epoch"]),
        best_val_map=float(state["best_map"]),
        val_preds=vp,
        val_truths=vt,
        preds=tp,
        truths=tt,
        rows=test.rows.tolist(),
    )


def _apply_nms(preds, iou: float):
    from torchvision.ops import nms

    out = []
    for boxes, scores in preds:
        keep = nms(torch.as_tensor(boxes), torch.as_tensor(scores), iou).numpy() if len(boxes) else np.zeros(0, int)
        out.append((boxes[keep], scores[keep]))
    return out


def _candidates(kept: list, floor: float = 0.05, n: int = 200) -> np.ndarray:
    """Score thresholds to try, strictest first: the predictions' own scores above ``floor`` (at most
    ``n`` of them, evenly spaced in rank), so the grid is fine where the true boxes' scores are."""
    scores = np.concatenate([s for _, s in kept]) if kept else np.zeros(0)
    scores = np.unique(scores[scores >= floor])[::-1]
    if len(scores) > n:
        scores = scores[np.linspace(0, len(scores) - 1, n).round().astype(int)]
    return scores if len(scores) else np.array([0.5])


def choose_operating_point(preds: list, truths: list, max_fdr: float = 0.02) -> dict:
    """NMS IoU and score threshold, on the given predictions (the inner validation folds': the outer
    folds that Table 2 reports are not used). When the best-F1 point already keeps the false discovery
    rate within ``max_fdr``, the loosest threshold that still does: as many abnormal cells found as the
    budget allows (a missed abnormal cell costs more in QC than a box a person dismisses), across NMS
    settings the highest hit rate. The margin below the validation boxes' scores is kept on purpose: new
    vessels score their cells lower. A detector not that precise gets its best-F1 point."""
    points = []
    for iou in NMS_CANDIDATES:
        kept = _apply_nms(preds, iou)
        for th in _candidates(kept):
            m = metrics.detection_metrics(kept, truths, float(th))
            f1 = 2 * m["tp"] / max(2 * m["tp"] + m["fp"] + m["fn"], 1)
            hit = 0.0 if math.isnan(m["hit_rate"]) else m["hit_rate"]
            fdr = 0.0 if math.isnan(m["fdr"]) else m["fdr"]  # nothing predicted: no false discovery
            points.append({"f1": f1, "hit_rate": hit, "fdr": fdr, "nms_iou": iou, "score_threshold": float(th)})
    best_f1 = max(points, key=lambda q: (q["f1"], q["score_threshold"]))
    if best_f1["fdr"] > max_fdr:
        return {**best_f1, "max_fdr": max_fdr, "rule": "best F1 (its FDR is above the budget)"}
    within = [q for q in points if q["fdr"] <= max_fdr]
    best = max(within, key=lambda q: (q["hit_rate"], -q["score_threshold"]))
    return {**best, "max_fdr": max_fdr, "rule": "loosest threshold within the FDR budget"}
