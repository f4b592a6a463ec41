"""The decoded cache and what reads it: bfloat16 where the hardware does it, the :class:`Cache` of uint8
images with their labels, folds and masks, and the augmentation from it (per image or batched)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .. import augment, inference
from ..config import DataConfig

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

    def centre_crop(self, side: int) -> Cache:
        """The same images cut to their centred ``side`` × ``side`` window (images, masks, covered pixels
        and boxes with them; a box left with no area is dropped). ``side`` 0 or not smaller: unchanged."""
        s = self.images.shape[-1]
        if not side or side >= s:
            return self
        o = (s - side) // 2
        win = (..., slice(o, o + side), slice(o, o + side))
        boxes = None
        if self.boxes is not None:
            boxes = []
            for b in self.boxes:
                b = np.clip(np.asarray(b, np.float32).reshape(-1, 4) - o, 0, side)
                boxes.append(b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])])
        return replace(
            self,
            images=np.ascontiguousarray(self.images[win]),
            masks=None if self.masks is None else np.ascontiguousarray(self.masks[win]),
            covered=None if self.covered is None else np.ascontiguousarray(self.covered[win]),
            boxes=boxes,
        )

    def split(self, outer: int, folds: int, *, inner_trains: bool = False) -> tuple[Cache, Cache, Cache]:
        """(training, inner validation, outer test) for validation fold ``outer``: the outer fold is
        the test part nothing is chosen on; the next fold is the inner validation part used for early
        stopping, thresholds and temperatures; the rest train. ``inner_trains``: there is nothing to
        choose on an inner part, so every fold but the outer one trains and the validation part is
        empty. ``outer < 0``: all images train and the two other parts are empty."""
        if outer < 0:
            return self, self.subset([]), self.subset([])
        test = np.flatnonzero(self.folds == outer)
        if inner_trains:
            return self.subset(np.flatnonzero(self.folds != outer)), self.subset([]), self.subset(test)
        inner = (outer + 1) % folds
        val = np.flatnonzero(self.folds == inner)
        train = np.flatnonzero((self.folds != outer) & (self.folds != inner))
        return self.subset(train), self.subset(val), self.subset(test)


def has_confluence(cache: Cache) -> bool:
    return len(cache) > 0 and bool(np.isfinite(cache.confluence).all())


def has_coverage(cache: Cache) -> bool:
    """Whether any image of the cache has the covered pixels (coverage supervision can train)."""
    return cache.covered_ok is not None and bool(cache.covered_ok.any())


class Augmenter:
    """The study's augmentations (training) or nothing (evaluation), then normalisation, applied to
    cached uint8 images. ``boxes``: detection samples (box-aware, boxes that leave the image dropped)."""

    def __init__(self, cfg: DataConfig, *, train: bool, boxes: bool = False, batched: bool = False, crop: int = 0):
        self.cfg, self.train, self.with_boxes = cfg, train, boxes
        # crop: training samples are a random crop × crop window of the cached image (its instance maps or
        # boxes with it) before the study's augmentations; 0 or evaluation: whole images
        self.crop = int(crop) if train else 0
        crop_steps: list[v2.Transform] = [v2.RandomCrop(self.crop)] if self.crop else []
        # batched: whole batches at once on the training device (augment.BatchAugment) instead of one
        # image at a time on the CPU; classification only
        self.batched = bool(batched) and not boxes
        self.batch_tf = augment.BatchAugment(cfg) if self.batched and train else None
        steps: list[v2.Transform] = []
        if train:
            steps = crop_steps + augment.geometric(cfg) + augment.photometric()
        # samples with instance maps (augment_with_masks): the same steps without the box clean-up below
        self.mask_tf = v2.Compose(list(steps)) if train else None
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
        """uint8 (C, S, S) → normalised float32 (C, S, S) [, boxes (k, 4)]. Both are copied out of ``img`` and
        ``boxes``, which may be read-only views of Ray's object store."""
        x = unit_float(img)
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) if self.with_boxes else None
        if self.tf is not None:
            sample: dict = {"image": tv_tensors.Image(x)}
            if b is not None:
                sample["boxes"] = tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=tuple(x.shape[-2:]))
                sample["labels"] = torch.ones(len(b), dtype=torch.int64)
            out = augment.apply(self.tf, sample, augment.sample_seed(self.cfg.seed, epoch, key))
            x = out["image"].as_subclass(torch.Tensor)
            if b is not None:
                b = out["boxes"].as_subclass(torch.Tensor).to(torch.float32).reshape(-1, 4)
        x = (x - self.mean) / self.std
        if b is not None:
            return x, b
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


def unit_float(img: np.ndarray) -> torch.Tensor:
    """uint8 → float32 in [0, 1], a copy: ``img`` may be a read-only view of Ray's object store."""
    return torch.tensor(img, dtype=torch.float32).div_(255.0)


def augment_with_masks(aug: Augmenter, img: np.ndarray, masks: np.ndarray, key: str, epoch: int):
    """uint8 (C, S, S) and uint16 (2, S, S) instance maps → normalised float32 (C, S', S') and int64
    (2, S', S'), the same geometric augmentation applied to both (nearest neighbour for the ids); S' is
    the training crop's side where ``aug`` has one, else S."""
    x = unit_float(img)
    m = torch.from_numpy(masks.astype(np.int64))
    if aug.train:
        out = augment.apply(
            aug.mask_tf,
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
