"""Abnormal-cell detector: torchvision RetinaNet trained with Ray Train (``TorchTrainer``, DDP).

One ``TorchTrainer`` run per validation fold under ``RUN/fold<k>``. Each of the N workers streams
its own Ray Data shard of the training images (a disjoint, equal-sized slice of the epoch's seeded
permutation, re-augmented every epoch with the box-aware recipe), so DDP steps stay in lock-step.
Images without abnormal cells are kept as negatives (empty targets): the model learns to say "none".

Rank 0 writes a checkpoint every epoch (model, optimizer, scheduler, epoch, config). ``FailureConfig``
restarts a failed worker group from the latest checkpoint, and rerunning the same command with the
same ``--out`` resumes each fold from its latest checkpoint (Ray Train V2 picks it up from the run's
storage path and name); finished folds are not trained again.

After training, every fold's model scores its validation images; the NMS IoU and score threshold are
chosen on those out-of-fold predictions (the loosest threshold whose FDR stays within ``max_fdr``) and
saved in the artifact. Metrics per
fold and mean ± SD: hit rate TP/(TP+FN) and false discovery rate FP/(TP+FP) at IoU ≥ 0.5, per box and
per image (definitions in :func:`msc_ray.metrics.detection_metrics`), and mAP@0.5.
"""

from __future__ import annotations

from .job import DetectJobConfig, detection_rows, job_from
from .predict import (
    NMS_CANDIDATES,
    FoldResult,
    _apply_nms,
    _device,
    _read_state,
    choose_operating_point,
    load_best,
    predict_fold,
)
from .results import TABLE2_KEYS
from .run import prepare_run, train_detector
from .worker import DetectorRun, _train_fold, detector_worker, log_fold

__all__ = [
    "DetectJobConfig",
    "job_from",
    "detection_rows",
    "DetectorRun",
    "detector_worker",
    "_train_fold",
    "log_fold",
    "NMS_CANDIDATES",
    "FoldResult",
    "_device",
    "_read_state",
    "load_best",
    "predict_fold",
    "_apply_nms",
    "choose_operating_point",
    "TABLE2_KEYS",
    "prepare_run",
    "train_detector",
]
