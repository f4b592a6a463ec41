"""The segmenter's instances: predictions, mask AP (COCO evaluation), counting and coverage errors and
the counting thresholds."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import metrics
from .cache import Augmenter, Cache
from .detector import detection_batches

SCORE_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # thresholds the counts and coverage are kept at


def mask_ap_metric():
    """torchmetrics' COCO mask AP (pycocotools backend) with its precision table kept, for per-class
    AP@0.5 and AP@[.5:.95] (:func:`mask_ap_summary`). Up to 500 detections per image (a dense culture
    holds hundreds of cells)."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(
        iou_type="segm",
        class_metrics=True,
        max_detection_thresholds=[1, 10, 500],
        backend="pycocotools",
        extended_summary=True,
        sync_on_compute=False,  # rank 0 alone validates: a cross-rank sync would wait forever
    )


def mask_ap_summary(metric) -> dict:
    """Per class (cell, nucleus): mask AP@0.5 and AP@[.5:.95], read from the COCO precision table
    (IoU × recall × class × area × max detections; all areas, 500 detections) the way COCO
    summarises it. A class with no true instance: NaN; true instances and no prediction at all: 0."""
    r = metric.compute()
    classes = [int(c) for c in torch.atleast_1d(r["classes"]).tolist()]
    out = {}
    for label, name in ((1, "cell"), (2, "nucleus")):
        ap50 = ap = float("nan")
        if label in classes and "precision" not in r:  # nothing predicted in any image
            ap50 = ap = 0.0
        elif label in classes:
            prec = r["precision"][:, :, classes.index(label), 0, -1]
            if (prec >= 0).any():
                ap50, ap = float(prec[0].clamp(min=0).mean()), float(prec.clamp(min=0).mean())
        out[f"{name}_mask_ap50"], out[f"{name}_mask_ap"] = ap50, ap
    return out


@torch.no_grad()
def predict_instances(
    model: nn.Module,
    cache: Cache,
    aug: Augmenter,
    *,
    batch_size: int,
    device: torch.device,
    metric=None,
    with_masks: bool = True,
    memo: dict | None = None,
):
    """A segmenter (:func:`msc_ray.models.build_segmenter`) on every cached image (no augmentation).
    Per image: ``boxes``, ``scores`` and ``labels`` of its detections; the truth (``true_boxes``,
    ``true_labels``, ``true_cells``, ``true_nuclei``: instances of :func:`instance_targets`;
    ``true_confluence``: the cache's); and ``coverage``: the fraction of the image under predicted cell
    masks (probability ≥ 0.5) of score ≥ each threshold of :data:`SCORE_GRID`. With ``metric``
    (:func:`mask_ap_metric`), each image's masks also update it. ``with_masks=False``: boxes only (no
    coverage, no metric), a quick validation. ``memo``: a dict that keeps a U-Net's maps per batch
    between calls on the same cache, batch size and model weights (its vote-centre threshold only
    changes how instances are drawn from them, :func:`msc_ray.segment.choose_vote_peak`)."""
    model.eval()
    out: list[dict] = []
    heads = getattr(model, "roi_heads", None)  # Mask R-CNN's; the U-Net's masks cost nothing extra
    mask_pool = heads.mask_roi_pool if heads is not None else None
    if not with_masks and heads is not None:  # torchvision's RoIHeads runs its mask branch only with a mask RoI pool
        heads.mask_roi_pool = None
    try:
        for b, (imgs, targets, _) in enumerate(detection_batches(cache, aug, batch_size)):
            for p, t in zip(_segment(model, imgs, device, memo, b), targets, strict=True):
                out.append(_instance_record(p, t, float(cache.confluence[len(out)]), metric, with_masks))
    finally:
        if heads is not None:
            heads.mask_roi_pool = mask_pool
    return out


def _segment(model: nn.Module, imgs: list, device, memo: dict | None, b: int) -> list[dict]:
    """The segmenter's detections for one batch; a U-Net's maps of batch ``b`` come from ``memo`` when
    it holds them (and are put there when it does not)."""
    if memo is None or not hasattr(model, "maps"):
        return model([i.to(device) for i in imgs])
    if b not in memo:
        memo[b] = model.maps(torch.stack(imgs).to(device)).cpu().numpy()
    return [model.instances(p, device) for p in memo[b]]


def _instance_record(p: dict, t: dict, confluence: float, metric, with_masks: bool) -> dict:
    """One image's Mask R-CNN output and truth → the record :func:`predict_instances` describes."""
    scores, labels = p["scores"].float().cpu(), p["labels"].cpu()
    rec = {
        "boxes": p["boxes"].float().cpu().numpy(),
        "scores": scores.numpy(),
        "labels": labels.numpy(),
        "true_boxes": t["boxes"].numpy(),
        "true_labels": t["labels"].numpy(),
        "true_cells": int((t["labels"] == 1).sum()),
        "true_nuclei": int((t["labels"] == 2).sum()),
        "true_confluence": confluence,
    }
    if not with_masks:
        return rec
    masks = p["masks"][:, 0].float().cpu() >= 0.5
    if metric is not None:
        metric.update(
            [{"masks": masks, "scores": scores, "labels": labels}],
            [{"masks": t["masks"].bool(), "labels": t["labels"]}],
        )
    cells, cell_scores = masks[labels == 1], scores[labels == 1]
    coverage = [float(cells[cell_scores >= th].any(0).float().mean()) if len(cells) else 0.0 for th in SCORE_GRID]
    rec["coverage"] = np.asarray(coverage)
    return rec


# visible-part areas (px) that recall_by_area counts between: a cell mostly under its neighbours, a sliver
# of a nucleus under another cell, up to whole ones
AREA_EDGES = (4, 16, 32, 64, 128, 256)


def recall_by_area(pred: dict, target: dict, edges: tuple[int, ...] = AREA_EDGES) -> np.ndarray:
    """One image's detections (``masks`` (K, 1, H, W) probabilities, ``labels``) and its truth
    (:func:`instance_targets`) → int (2 classes, 2, len(edges)): per class (cell, nucleus) and area bin
    (``edges[i]`` ≤ area < ``edges[i + 1]``, the last bin open), the true instances ``[:, 0]`` and those
    a predicted mask of the same class covers at mask IoU ≥ 0.5 ``[:, 1]`` (COCO's AP@0.5 match, without
    its one-to-one ranking: which instances are out of reach, by size). Sum over images."""
    from pycocotools import mask as coco_mask

    def rle(m: torch.Tensor) -> list:  # (K, H, W) bool → COCO run-length encodings
        return coco_mask.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))

    out = np.zeros((2, 2, len(edges)), np.int64)
    masks = pred["masks"][:, 0].float().cpu() >= 0.5
    for c, label in enumerate((1, 2)):
        true = target["masks"][target["labels"] == label].bool()
        if not len(true):
            continue
        true_rle = rle(true)
        bins = np.searchsorted(np.asarray(edges), coco_mask.area(true_rle), side="right") - 1
        found = np.zeros(len(true), bool)
        mine = masks[pred["labels"].cpu() == label]
        if len(mine):  # COCO's mask IoU, (predicted, true)
            found = (np.asarray(coco_mask.iou(rle(mine), true_rle, [0] * len(true))) >= 0.5).any(0)
        ok = bins >= 0  # instances under edges[0] px are no targets
        np.add.at(out[c, 0], bins[ok], 1)
        np.add.at(out[c, 1], bins[ok & found], 1)
    return out


def instance_box_ap(preds: list[dict], label: int) -> float:
    """Box AP@0.5 (VOC, :func:`metrics.average_precision`) of one class from :func:`predict_instances`."""
    return metrics.average_precision(
        [(p["boxes"][p["labels"] == label], p["scores"][p["labels"] == label]) for p in preds],
        [p["true_boxes"][p["true_labels"] == label] for p in preds],
    )


def instance_counts(preds: list[dict], label: int, threshold: float) -> np.ndarray:
    """Predicted instances of ``label`` with score ≥ ``threshold``, per image."""
    return np.array([int(((p["labels"] == label) & (p["scores"] >= threshold)).sum()) for p in preds])


def count_error(preds: list[dict], label: int, threshold: float) -> float:
    """Mean relative counting error |predicted − true| / true over images with at least one true
    instance (NaN when none has)."""
    key = "true_cells" if label == 1 else "true_nuclei"
    true = np.array([p[key] for p in preds], float)
    pred = instance_counts(preds, label, threshold)
    ok = true > 0
    return float(np.mean(np.abs(pred[ok] - true[ok]) / true[ok])) if ok.any() else float("nan")


def coverage_mae(preds: list[dict], threshold: float) -> float:
    """Mask-based confluence MAE in percentage points against the true confluence, at the grid
    threshold nearest ``threshold``."""
    i = int(np.argmin(np.abs(np.asarray(SCORE_GRID) - threshold)))
    err = [abs(p["coverage"][i] - p["true_confluence"]) for p in preds if np.isfinite(p["true_confluence"])]
    return 100.0 * float(np.mean(err)) if err else float("nan")


def choose_count_thresholds(preds: list[dict]) -> dict:
    """Per class, the :data:`SCORE_GRID` threshold with the lowest mean relative counting error on
    ``preds`` (the inner validation folds': never the folds that are reported)."""
    out = {}
    for label, name in ((1, "cell"), (2, "nucleus")):
        errs = [count_error(preds, label, th) for th in SCORE_GRID]
        errs = [e if np.isfinite(e) else np.inf for e in errs]
        out[name] = float(SCORE_GRID[int(np.argmin(errs))])
    return out
