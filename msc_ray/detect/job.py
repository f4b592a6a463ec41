"""The detector job's configuration and the rows it may learn from."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .. import data, engine, models
from ..config import DataConfig, from_dict

log = logging.getLogger(__name__)

MIN_CROP = 32  # the smallest training crop (px): a few cells across


@dataclass(frozen=True)
class DetectJobConfig:
    kind: ClassVar[str] = "detector"  # the Ray Train worker rebuilds the job from this (see job_from)
    backbones: ClassVar[tuple[str, ...]] = models.DETECTOR_BACKBONES

    manifest: str
    out: str
    stack: str = "sstack"
    folds: tuple[int, ...] = ()  # validation folds to run; () = every fold of the manifest
    epochs: int = 30  # at most: early stopping on the inner validation fold's mAP@0.5
    patience: int = 6
    min_epochs: int = 0  # no validation nor stopping before this epoch; 0: half of --epochs (detectors
    # learn little in their first epochs, then fast: stopping during that plateau stops them for good)
    workers: int = 2
    gpu: bool = False
    cpus_per_worker: float = 1.0
    max_fdr: float = 0.02  # the operating point: the loosest threshold whose inner-validation FDR stays within
    placement: str = "PACK"  # PACK: workers share nodes where they fit; SPREAD: one node each where it can
    backbone: str = "compact_fpn"
    size: int = 128  # abnormal cells are large: 128 px keeps them 20–50 px across
    batch_size: int = 4  # small batches: more steps per epoch (measured: found cells by epoch 10, not 20)
    # training samples: random crop × crop windows of the --size images (0: whole images); early stopping
    # then reads the centred window of each inner image, so an epoch costs what a crop-sized corpus would
    crop: int = 0
    lr: float = 1e-3
    grad_clip: float = 10.0  # gradient-norm cap
    weight_decay: float = 1e-4
    tilt_share: float = 0.5  # share of training samples rotated by a small angle too (augment.RotateCrop)
    seed: int = 0
    # training steps under bfloat16 autocast (engine.use_bf16: auto = a GPU, or a CPU that does bf16 in
    # hardware); inner validation, outer folds and exports are read in float32, as scoring reads them on CPUs
    precision: str = "auto"
    max_failures: int = 2
    fail_at_epoch: int = 0  # fault injection for tests: the last rank dies once mid-way through the
    # epoch after this one (the checkpoint of this epoch is then the one to resume from)
    endpoint_url: str | None = None

    def validate(self) -> None:
        if self.backbone not in self.backbones:
            raise ValueError(f"--backbone must be one of {', '.join(self.backbones)}, got {self.backbone!r}")
        if self.placement not in ("PACK", "SPREAD"):
            raise ValueError(f"--placement must be PACK or SPREAD, got {self.placement!r}")
        if self.workers < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("--workers, --epochs and --batch-size must be at least 1")
        if self.crop and not MIN_CROP <= self.crop <= self.size:
            raise ValueError(f"--crop {self.crop}: 0 (whole images) or {MIN_CROP} to --size ({self.size}) px")
        engine.check_precision(self.precision)

    def build_model(self, anchors: dict, **kwargs) -> torch.nn.Module:
        return models.build_detector(self.backbone, image_size=self.size, anchors=anchors, **kwargs)

    def validation_score(self, model, val: engine.Cache, aug: engine.Augmenter, device) -> float:
        """What early stopping follows on the inner validation part: mAP@0.5 (NaN: nothing to find)."""
        preds, truths = engine.predict_detections(model, val, aug, batch_size=self.batch_size * 2, device=device)
        return engine.detection_map(preds, truths)

    def data_config(self) -> DataConfig:
        # RetinaNet normalises inside its own transform: the pipeline hands it [0, 1] images
        return DataConfig(
            size=self.size,
            channels=3,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            tilt_share=self.tilt_share,
            seed=self.seed,
            endpoint_url=self.endpoint_url,
        )


def job_from(config: dict) -> DetectJobConfig:
    """The job of a worker's ``train_loop_config``: a detector's, or a segmenter's (``kind``)."""
    cls = DetectJobConfig
    if config.get("kind") == "segmenter":
        from ..segment import SegmentJobConfig as cls
    return from_dict(cls, config["job"])


def detection_rows(manifest, stack: str):
    """Rows the detector may learn from: images whose annotation parsed (``ok``). A missing or
    malformed XML says nothing about the image's cells, so it must not train as "no abnormal cell"."""
    import pyarrow.compute as pc

    rows = data.select(manifest, stack=stack)
    good = rows.filter(pc.equal(rows["annotation"], "ok"))
    left = rows.num_rows - good.num_rows
    if left:
        log.warning("detector: %d %s image(s) without a usable annotation left out", left, stack)
    if good.num_rows == 0:
        raise ValueError(f"no {stack} image has a usable Pascal VOC annotation")
    return good


def _inject_fault(job: DetectJobConfig, fold: int) -> None:
    """Kill this worker process once, without any clean-up (tests of FailureConfig and resume)."""
    marker = Path(job.out) / f".fault-injected-fold{fold}"
    if not marker.exists():
        marker.write_text("killed once on purpose\n")
        time.sleep(3)  # let the controller register the previous epoch's checkpoint first
        os._exit(1)
