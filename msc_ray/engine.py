"""Training and evaluation loops shared by the classifier trials and the detector workers.

The torchvision references' split: :func:`train_one_epoch` and :func:`evaluate` (and their detector
twins) are plain functions over a model and an in-memory :class:`Cache`; Tune trials and Ray Train
workers are thin wrappers around them, and tests call them without Ray.

Epochs are cheap because images are decoded, equalised (multi-stack) and resized **once**: the
cache holds uint8 ``(N, C, S, S)`` arrays (built by Ray Data tasks in :func:`msc_ray.data.build_cache`
and shared with trials and workers through Ray's object store). Every epoch then applies the study's
seven augmentations to the cached pixels, seeded per (seed, epoch, image), and normalises.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from . import augment, check_views, inference, metrics
from .config import DataConfig

PRECISIONS = ("auto", "bf16", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this machine's CPU does bfloat16 arithmetic in hardware (AMX or AVX-512 BF16, from the
    kernel's CPU flags; False where they cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return bool({"amx_bf16", "avx512_bf16"} & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def check_precision(precision: str) -> None:
    """A one-line error naming ``--precision`` unless it is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether a model trains (a classifier also predicts) under bfloat16 autocast: ``precision``
    ``bf16`` or ``fp32`` as asked; ``auto`` on a GPU, and on a CPU that does bfloat16 in hardware
    (:func:`cpu_has_bf16`), where a training step of the compact CNN took half the time (one core,
    batch 32: 129 → 73 ms at 64 px, 516 → 262 ms at 128 px) for the same accuracy (README), and steps
    of the detector and the U-Net segmenter 0.43 and 0.67 of theirs."""
    check_precision(precision)
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


@dataclass
class Cache:
    """Decoded, preprocessed images of one stack at one input size, and what belongs to them.

    ``images`` uint8 (N, C, S, S); ``labels`` int64 (N,); ``rows`` int64 (N,) manifest row indices;
    ``folds`` int64 (N,); ``keys`` image paths (augmentation seeds); ``confluence`` float32 (N,) in
    [0, 1] or NaN where unknown; ``boxes`` a list of float32 (k, 4) ``[x1, y1, x2, y2]`` in the cached
    frame (detection caches only); ``masks`` uint16 (N, 2, S, S) cell and nucleus instance ids in the
    cached frame (segmentation caches only); ``covered`` uint8 (N, S, S) 1 where a cell covers the
    pixel and ``covered_ok`` bool (N,) whether the image had a cell mask (classification caches of
    corpora with masks: coverage supervision); ``errors`` one line per image that could not be read."""

    images: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    folds: np.ndarray
    keys: list[str]
    confluence: np.ndarray
    boxes: list[np.ndarray] | None = None
    errors: tuple[str, ...] = ()
    masks: np.ndarray | None = None
    covered: np.ndarray | None = None
    covered_ok: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> Cache:
        idx = np.asarray(idx, np.int64)
        return Cache(
            images=self.images[idx],
            labels=self.labels[idx],
            rows=self.rows[idx],
            folds=self.folds[idx],
            keys=[self.keys[i] for i in idx],
            confluence=self.confluence[idx],
            boxes=[self.boxes[i] for i in idx] if self.boxes is not None else None,
            errors=self.errors,
            masks=self.masks[idx] if self.masks is not None else None,
            covered=self.covered[idx] if self.covered is not None else None,
            covered_ok=self.covered_ok[idx] if self.covered_ok is not None else None,
        )

    def split(self, outer: int, folds: int) -> tuple[Cache, Cache, Cache]:
        """(training, inner validation, outer test) for validation fold ``outer``: the outer fold is
        the test part nothing is chosen on; the next fold is the inner validation part used for early
        stopping, thresholds and temperatures; the rest train. ``outer < 0``: all images train and the
        two other parts are empty."""
        if outer < 0:
            return self, self.subset([]), self.subset([])
        inner = (outer + 1) % folds
        test = np.flatnonzero(self.folds == outer)
        val = np.flatnonzero(self.folds == inner)
        train = np.flatnonzero((self.folds != outer) & (self.folds != inner))
        return self.subset(train), self.subset(val), self.subset(test)


def has_confluence(cache: Cache) -> bool:
    return len(cache) > 0 and bool(np.isfinite(cache.confluence).all())


def has_coverage(cache: Cache) -> bool:
    """Whether any image of the cache has the covered pixels (coverage supervision can train)."""
    return cache.covered_ok is not None and bool(cache.covered_ok.any())


# --------------------------------------------------------------------------------------------------
# Augmentation from the cache
# --------------------------------------------------------------------------------------------------


class Augmenter:
    """The study's augmentations (training) or nothing (evaluation), then normalisation, applied to
    cached uint8 images. ``boxes``: detection samples (box-aware, boxes that leave the image dropped)."""

    def __init__(self, cfg: DataConfig, *, train: bool, boxes: bool = False, batched: bool = False):
        self.cfg, self.train, self.with_boxes = cfg, train, boxes
        # batched: whole batches at once on the training device (augment.BatchAugment) instead of one
        # image at a time on the CPU; classification only
        self.batched = bool(batched) and not boxes
        self.batch_tf = augment.BatchAugment(cfg) if self.batched and train else None
        steps: list[v2.Transform] = []
        if train:
            steps = augment.geometric(cfg) + augment.photometric()
        if boxes:
            steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)]
        self.tf = v2.Compose(steps) if steps else None
        self.mean = torch.tensor(cfg.norm_mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(cfg.norm_std, dtype=torch.float32).view(-1, 1, 1)
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def norm_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) on ``device``, moved there once rather than every batch."""
        if device not in self._norm:
            self._norm[device] = (self.mean.to(device), self.std.to(device))
        return self._norm[device]

    def one(self, img: np.ndarray, key: str, epoch: int, boxes: np.ndarray | None = None):
        """uint8 (C, S, S) → normalised float32 (C, S, S) [, boxes (k, 4)]."""
        x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
        if self.tf is not None:
            sample: dict = {"image": tv_tensors.Image(x)}
            if self.with_boxes:
                b = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
                sample["boxes"] = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=tuple(x.shape[-2:]))
                sample["labels"] = torch.ones(len(b), dtype=torch.int64)
            out = augment.apply(self.tf, sample, augment.sample_seed(self.cfg.seed, epoch, key))
            x = out["image"].as_subclass(torch.Tensor)
            if self.with_boxes:
                boxes = out["boxes"].as_subclass(torch.Tensor)
        x = (x - self.mean) / self.std
        if self.with_boxes:
            return x, torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        return x


def augment_batch(aug: Augmenter, images_u8: np.ndarray, keys: list[str], epoch: int, device, covered=None):
    """A batched :class:`Augmenter`'s path: uint8 (B, C, S, S) → normalised float32 (B, C, S, S) on
    ``device`` (pinned, non-blocking copy of the uint8 pixels; augmentation and normalisation there).
    ``covered`` uint8 (B, S, S) → float (B, 1, S, S) moved with the same geometry; None passes."""
    x = inference.to_device(images_u8, device).float().div_(255.0)
    cov = None if covered is None else inference.to_device(covered, device)[:, None]
    if aug.batch_tf is not None:
        x, cov = aug.batch_tf(x, keys, epoch, cov)
    mean, std = aug.norm_on(device)
    return (x - mean) / std, (None if cov is None else cov.float())


def augment_with_masks(aug: Augmenter, img: np.ndarray, masks: np.ndarray, key: str, epoch: int):
    """uint8 (C, S, S) and uint16 (2, S, S) instance maps → normalised float32 (C, S, S) and int64
    (2, S, S), the same geometric augmentation applied to both (nearest neighbour for the ids)."""
    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
    m = torch.from_numpy(masks.astype(np.int64))
    if aug.train:
        tf = aug.tf if not aug.with_boxes else v2.Compose(augment.geometric(aug.cfg) + augment.photometric())
        out = augment.apply(
            tf,
            {"image": tv_tensors.Image(x), "masks": tv_tensors.Mask(m)},
            augment.sample_seed(aug.cfg.seed, epoch, key),
        )
        x, m = out["image"].as_subclass(torch.Tensor), out["masks"].as_subclass(torch.Tensor)
    return (x - aug.mean) / aug.std, m


def instance_targets(label_maps: torch.Tensor, min_area: int = 4) -> dict[str, torch.Tensor]:
    """(2, S, S) cell and nucleus id maps → Mask R-CNN targets: ``masks`` (K, S, S) uint8, ``boxes``
    (K, 4) ``[x1, y1, x2, y2]`` pixel edges, ``labels`` (K,) 1 = cell, 2 = nucleus. Instances under
    ``min_area`` pixels (slivers of cells hidden by their neighbours) are left out."""
    from torchvision.ops import masks_to_boxes

    masks, labels = [], []
    for channel, label in ((0, 1), (1, 2)):
        ids = label_maps[channel]
        uniq, counts = torch.unique(ids, return_counts=True)
        keep = uniq[(uniq > 0) & (counts >= min_area)]
        if len(keep):
            masks.append((ids[None] == keep[:, None, None]).to(torch.uint8))
            labels.append(torch.full((len(keep),), label, dtype=torch.int64))
    s = label_maps.shape[-1]
    if not masks:
        return {
            "masks": torch.zeros((0, s, s), dtype=torch.uint8),
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
    m = torch.cat(masks)
    boxes = masks_to_boxes(m)
    boxes[:, 2:] += 1  # pixel edges: x2 = last column + 1
    return {"masks": m, "boxes": boxes, "labels": torch.cat(labels)}


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of one epoch: the same on every process."""
    return np.random.default_rng([seed, epoch, 11]).permutation(n)


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


# --------------------------------------------------------------------------------------------------
# Schedules and losses
# --------------------------------------------------------------------------------------------------


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


def balanced_weights(labels: np.ndarray, k: int) -> torch.Tensor:
    """scikit-learn's "balanced" class weights, 1 for a class absent from ``labels``."""
    from sklearn.utils.class_weight import compute_class_weight

    w = np.ones(k)
    present = np.unique(labels)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.tensor(w, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Classifier: one epoch, evaluation
# --------------------------------------------------------------------------------------------------


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
) -> dict:
    """One pass over the (augmented) training cache; the schedule steps per batch. Returns
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


# --------------------------------------------------------------------------------------------------
# Detector: batches, one epoch, predictions
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Segmenter: predictions, mask AP, counts and coverage
# --------------------------------------------------------------------------------------------------

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
