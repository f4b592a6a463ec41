"""The classifier's pure loops: batches from the cache, schedule and losses, one training epoch,
prediction over test-time views and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import check_views, metrics
from .cache import (
    Augmenter,
    Cache,
    augment_batch,
    augment_with_masks,
    epoch_order,
    has_confluence,
    has_coverage,
    use_bf16,
)


def classification_batches(
    cache: Cache,
    aug: Augmenter,
    batch_size: int,
    *,
    epoch: int = 0,
    shuffle: bool = False,
    coverage: bool = False,
    device: torch.device | None = None,
) -> Iterator[tuple]:
    """``(images (B, C, S, S), labels (B,), confluence (B,))`` from the cache. Training order is the
    seeded permutation of the epoch; a last batch of one image is dropped in training (BatchNorm).
    ``coverage`` (a cache with ``covered``) adds ``(covered (B, 1, S, S) float, known (B,) bool)``: the
    covered pixels moved with the image's geometric augmentation (the same draws as without them).
    A batched augmenter (``Augmenter(..., batched=True)``) prepares each batch on ``device``, where the
    tensors then already are; otherwise batches are made on the CPU one image at a time."""
    order = epoch_order(len(cache), aug.cfg.seed, epoch) if shuffle else np.arange(len(cache))
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if shuffle and len(idx) < 2:
            break
        labels = torch.from_numpy(cache.labels[idx])
        conf = torch.from_numpy(cache.confluence[idx].astype(np.float32))
        if aug.batched:
            keys = [cache.keys[j] for j in idx]
            cov = cache.covered[idx] if coverage else None
            x, covered = augment_batch(aug, cache.images[idx], keys, epoch, device or torch.device("cpu"), cov)
            if coverage:
                yield x, labels, conf, covered, torch.from_numpy(cache.covered_ok[idx])
            else:
                yield x, labels, conf
            continue
        if not coverage:
            yield torch.stack([aug.one(cache.images[j], cache.keys[j], epoch) for j in idx]), labels, conf
            continue
        pairs = [augment_with_masks(aug, cache.images[j], cache.covered[j][None], cache.keys[j], epoch) for j in idx]
        x = torch.stack([p[0] for p in pairs])
        covered = torch.stack([p[1] for p in pairs]).float()
        yield x, labels, conf, covered, torch.from_numpy(cache.covered_ok[idx])


@dataclass
class EarlyStopping:
    """Keeps the best epoch's weights of a validation metric (higher is better) and says when
    ``patience`` epochs have passed without a better value."""

    patience: int
    best: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_state: dict | None = None

    def update(self, value: float, epoch: int, model: nn.Module) -> bool:
        """Record epoch ``epoch`` (1-based); True when it is the best so far (its weights kept)."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.bad_epochs, self.best_state = int(state["bad_epochs"]), state["best_state"]


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 1 % to the base rate over ``warmup_steps``, then cosine decay to 1 %."""
    total_steps = max(total_steps, 1)
    warmup_steps = min(max(warmup_steps, 0), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / max(warmup_steps, 1)
        t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class ClassifierLoss:
    """Class-weighted cross-entropy on the first K outputs, plus (when the model has a confluence
    output) ``regression_weight`` × smooth L1 between sigmoid(output K) and the measured confluence,
    plus (coverage supervision, :meth:`coverage`) ``coverage_weight`` × binary cross-entropy between a
    coverage map and the share of each of its cells that cells cover."""

    class_weights: torch.Tensor
    num_classes: int
    regression_weight: float = 5.0
    coverage_weight: float = 1.0

    def __call__(self, out: torch.Tensor, y: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out[:, : self.num_classes], y, weight=self.class_weights)
        if out.shape[1] > self.num_classes:
            pred = torch.sigmoid(out[:, self.num_classes])
            loss = loss + self.regression_weight * nn.functional.smooth_l1_loss(pred, conf, beta=0.05)
        return loss

    def coverage(self, logits: torch.Tensor, covered: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Coverage term: ``logits`` (B, 1, h, w) against the covered pixels (B, 1, S, S) averaged
        over each of the map's cells; images whose mask is unknown count nothing."""
        if not bool(known.any()):
            return logits.sum() * 0.0
        target = nn.functional.adaptive_avg_pool2d(covered, logits.shape[-2:])
        bce = nn.functional.binary_cross_entropy_with_logits(logits[known], target[known])
        return self.coverage_weight * bce


def weight_average(model: nn.Module, horizon_steps: float) -> torch.optim.swa_utils.AveragedModel:
    """A moving average of ``model``'s weights and BatchNorm statistics (torch's ``AveragedModel``,
    ``use_buffers``): the plain mean of the steps so far until there are ``horizon_steps`` of them,
    then exponential with that time constant (each update moves the average ``1 / horizon_steps`` of
    the way to the model), so a short run's average does not hold on to its first steps' weights. The
    average (``.module``) is what validates, is kept as the best epoch and is exported; training
    steps the model itself."""
    from torch.optim.swa_utils import AveragedModel

    horizon = max(float(horizon_steps), 1.0)

    @torch.no_grad()
    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], n: torch.Tensor) -> None:
        # one call per (device, dtype) group; the step's weight stays a tensor on the device (no host sync)
        if not averages[0].is_floating_point():  # counters (BatchNorm's batches seen) are the model's own
            for a, c in zip(averages, currents, strict=True):
                a.copy_(c)
            return
        w = torch.clamp(1.0 / (n.to(averages[0].dtype) + 1.0), min=1.0 / horizon)
        for a, c in zip(averages, currents, strict=True):
            a.lerp_(c, w)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def balanced_weights(labels: np.ndarray, k: int) -> torch.Tensor:
    """scikit-learn's "balanced" class weights, 1 for a class absent from ``labels``."""
    from sklearn.utils.class_weight import compute_class_weight

    w = np.ones(k)
    present = np.unique(labels)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(w, dtype=torch.float32)


def train_one_epoch(
    model: nn.Module,
    cache: Cache,
    aug: Augmenter,
    opt: torch.optim.Optimizer,
    sched,
    loss_fn: ClassifierLoss,
    *,
    epoch: int,
    batch_size: int,
    device: torch.device,
    precision: str = "auto",
    average: torch.optim.swa_utils.AveragedModel | None = None,
) -> dict:
    """One pass over the (augmented) training cache; the schedule steps per batch, and ``average``
    (:func:`weight_average`), when given, takes the weights after each step. Returns
    ``{"loss": mean loss, "images": count}``. A model with a coverage head (compact CNN) on a cache
    with covered pixels also learns the coverage map (:meth:`ClassifierLoss.coverage`). The forward
    pass runs under bfloat16 autocast where :func:`use_bf16` says so; losses are float32."""
    model.train()
    total, n = 0.0, 0
    amp = use_bf16(device, precision)
    coverage = getattr(model, "coverage", None) is not None and has_coverage(cache)
    for batch in classification_batches(
        cache, aug, batch_size, epoch=epoch, shuffle=True, coverage=coverage, device=device
    ):
        x, y, conf = batch[:3]
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)  # the models' layout
        y, conf = y.to(device), conf.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, cov = model.forward_with_coverage(x) if coverage else (model(x), None)
        loss = loss_fn(out.float(), y, conf)
        if coverage:
            loss = loss + loss_fn.coverage(cov.float(), batch[3].to(device), batch[4].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if average is not None:
            average.update_parameters(model)
        total = total + loss.detach() * len(y)  # summed on the device: no host sync per step
        n += len(y)
    return {"loss": float(total) / max(n, 1), "images": n}


def dihedral_view(x: torch.Tensor, i: int) -> torch.Tensor:
    """View ``i`` of 8 of a batch ``(N, C, H, W)`` of square images: ``i // 2`` quarter turns, then a
    left-right mirror when ``i`` is odd — the group of exact pixel moves that training draws its quarter
    turns and flips from. View 0 is the image itself."""
    x = torch.rot90(x, i // 2, (2, 3)) if i // 2 else x
    return torch.flip(x, (3,)) if i % 2 else x


def view_mean(forward, x: torch.Tensor, views: int = 1, back=None) -> torch.Tensor:
    """``forward(x)`` averaged over ``views`` views of each image (test-time augmentation): 1 — the
    image as it is; 4 — its four quarter turns; 8 — those and their mirror images. The raw outputs
    (logits, regression logit) are averaged, so a temperature fitted on them applies as it does to one
    view. Culture images have no up or left; one view's answer moves with how the flask was
    photographed (on 400 held-out single-stack images the eight views of one model ranged 0.898–0.925
    in band accuracy); the mean is steadier. ``back(out, i)``: for outputs that are pixel maps, view
    ``i``'s output brought back to the image's own frame before it is added."""
    check_views(views, f"views={views}")
    step = 8 // views
    out = forward(x).float()
    for i in range(step, 8, step):
        o = forward(dihedral_view(x, i)).float()
        out = out + (back(o, i) if back is not None else o)
    return out / views


@torch.no_grad()
def predict(
    model: nn.Module,
    cache: Cache,
    aug: Augmenter,
    *,
    batch_size: int,
    device: torch.device,
    views: int = 1,
    precision: str = "auto",
) -> np.ndarray:
    """Raw model outputs (N, K[+1]) for the cache, in eval mode, no augmentation; with ``views`` > 1
    averaged over that many views of each image (:func:`view_mean`); float32, computed under bfloat16
    autocast where :func:`use_bf16` says so."""
    model.eval()
    outs = []
    amp = use_bf16(device, precision)
    for x, _, _ in classification_batches(cache, aug, batch_size, device=device):
        x = x.to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outs.append(view_mean(model, x, views).cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 0), np.float32)


def evaluate(outputs: np.ndarray, cache: Cache, classes: list[str], temperature: float = 1.0) -> dict:
    """Metrics of raw outputs against the cache's labels (and confluence, when both exist):
    micro and per-class figures, ECE and, with a confluence output, its MAE in percentage points."""
    k = len(classes)
    probs = metrics.calibrated(outputs[:, :k], temperature)
    m = metrics.classification_metrics(cache.labels, probs)
    m["per_class"] = metrics.per_class_metrics(cache.labels, probs, classes)
    m["ece"] = metrics.expected_calibration_error(cache.labels, probs)
    if outputs.shape[1] > k and has_confluence(cache):
        pct = confluence_from_outputs(outputs, classes, temperature)
        m["confluence_mae"] = float(np.mean(np.abs(pct - 100 * cache.confluence)))
    return m


def confluence_from_outputs(outputs: np.ndarray, classes: list[str], temperature: float = 1.0) -> np.ndarray:
    """Confluence % per image, always inside the predicted band (see :func:`metrics.confluence_in_band`)."""
    k = len(classes)
    probs = metrics.calibrated(outputs[:, :k], temperature)
    regressed = 1 / (1 + np.exp(-outputs[:, k])) if outputs.shape[1] > k else None
    return metrics.confluence_in_band(probs, regressed)
