"""The detector's pure loops: batches with boxes, one training epoch (a DDP rank's slice), predictions,
mAP and the anchor plan from the training boxes."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import metrics
from .cache import Augmenter, Cache, augment_with_masks, epoch_order, instance_targets


def detection_batches(cache: Cache, aug: Augmenter, batch_size: int, *, epoch: int = 0, order=None):
    """``(list of images (3, S, S), list of {"boxes": (k, 4), "labels": (k,)}, rows)`` in ``order``
    (default: the cache's order). Images without abnormal cells come with empty targets (negatives).
    A segmentation cache (``cache.masks``) gives Mask R-CNN targets (:func:`instance_targets`)."""
    order = np.arange(len(cache)) if order is None else np.asarray(order)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        imgs, targets = [], []
        if cache.masks is not None:
            for j in idx:
                x, m = augment_with_masks(aug, cache.images[j], cache.masks[j], cache.keys[j], epoch)
                imgs.append(x)
                targets.append(instance_targets(m))
            yield imgs, targets, cache.rows[idx]
            continue
        for j in idx:
            x, b = aug.one(cache.images[j], cache.keys[j], epoch, cache.boxes[j])
            imgs.append(x)
            targets.append({"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)})
        yield imgs, targets, cache.rows[idx]


def rank_slice(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """This rank's equal-sized slice of the epoch's seeded permutation (every rank takes the same
    number of steps, so DDP's all-reduce never waits for a rank that ran out)."""
    perm = epoch_order(n, seed, epoch)
    per = n // world
    return perm[rank * per : (rank + 1) * per]


def train_detector_epoch(
    model: nn.Module,
    cache: Cache,
    aug: Augmenter,
    opt: torch.optim.Optimizer,
    sched,
    *,
    epoch: int,
    batch_size: int,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
    on_step=None,
    clip: float = 0.0,
    bf16: bool = False,
) -> dict:
    """One epoch of detector or segmenter training on this rank's slice; the schedule steps per batch;
    ``clip`` caps the gradient norm (0: no cap); ``bf16``: the forward pass under bfloat16 autocast
    (:func:`use_bf16`), the losses summed in float32 and the weights, gradients and optimiser float32."""
    model.train()
    total, steps, boxes, parts = 0.0, 0, 0, {}
    order = rank_slice(len(cache), seed, epoch, rank, world)
    for imgs, targets, _ in detection_batches(cache, aug, batch_size, epoch=epoch, order=order):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model([i.to(device) for i in imgs], [{k: v.to(device) for k, v in t.items()} for t in targets])
        losses = {k: v.float() for k, v in losses.items()}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach())
        for k, v in losses.items():
            parts[k] = parts.get(k, 0.0) + float(v.detach())
        steps += 1
        boxes += sum(len(t["boxes"]) for t in targets)
        if on_step is not None:
            on_step(steps)
    return {
        "loss": total / max(steps, 1),
        "images": len(order),
        "boxes": boxes,
        "steps": steps,
        **{k: v / max(steps, 1) for k, v in parts.items()},
    }


@torch.no_grad()
def predict_detections(model: nn.Module, cache: Cache, aug: Augmenter, *, batch_size: int, device: torch.device):
    """``[(boxes (k, 4), scores (k,))]`` per cached image and the true boxes ``[(m, 4)]``."""
    model.eval()
    preds = []
    for imgs, _, _ in detection_batches(cache, aug, batch_size):
        for out in model([i.to(device) for i in imgs]):
            preds.append((out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy()))
    return preds, [np.asarray(b, np.float32).reshape(-1, 4) for b in (cache.boxes or [])]


def detection_map(preds, truths) -> float:
    """mAP@0.5 of predictions against truth (NaN when there is nothing to find)."""
    return metrics.average_precision(preds, truths)


def anchor_plan(boxes: list[np.ndarray], levels: int, per_level: int = 3) -> dict:
    """Anchor sizes and aspect ratios from the training boxes: ``levels × per_level`` sizes spread
    geometrically from the 5th to the 95th percentile of the boxes' sqrt(area) (widened by 25 %),
    smallest on the finest level; aspect ratios (height / width) at the 10th, 50th and 90th
    percentiles. Falls back to 16–64 px squares-ish when there are no boxes."""
    allb = np.concatenate([b.reshape(-1, 4) for b in boxes]) if boxes else np.zeros((0, 4))
    w, h = allb[:, 2] - allb[:, 0], allb[:, 3] - allb[:, 1]
    keep = (w > 1) & (h > 1)
    if keep.sum() >= 3:
        side = np.sqrt(w[keep] * h[keep])
        lo, hi = np.percentile(side, 5) / 1.25, np.percentile(side, 95) * 1.25
        ratios = np.clip(np.percentile(h[keep] / w[keep], [10, 50, 90]), 0.33, 3.0)
    else:
        lo, hi, ratios = 16.0, 64.0, np.array([0.5, 1.0, 2.0])
    sizes = np.geomspace(lo, max(hi, lo * 1.01), levels * per_level)
    return {
        "sizes": [[round(float(s), 2) for s in sizes[i * per_level : (i + 1) * per_level]] for i in range(levels)],
        "aspect_ratios": sorted({round(float(r), 3) for r in ratios}),
    }
