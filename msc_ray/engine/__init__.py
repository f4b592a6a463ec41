"""Training and evaluation loops shared by the classifier trials and the detector workers.

The torchvision references' split: :func:`train_one_epoch` and :func:`evaluate` (and their detector
twins) are plain functions over a model and an in-memory :class:`Cache`; Tune trials and Ray Train
workers are thin wrappers around them, and tests call them without Ray.

Epochs are cheap because images are decoded, equalised (multi-stack) and resized **once**: the
cache holds uint8 ``(N, C, S, S)`` arrays (built by Ray Data tasks in :func:`msc_ray.data.build_cache`
and shared with trials and workers through Ray's object store). Every epoch then applies the study's
seven augmentations to the cached pixels, seeded per (seed, epoch, image), and normalises.

Modules: :mod:`.cache` (the cache, bfloat16 where the hardware does it, augmentation from the cache),
:mod:`.classifier`, :mod:`.detector` and :mod:`.instances` (the segmenter's instances and their measures).
"""

from .cache import (
    PRECISIONS,
    Augmenter,
    Cache,
    augment_batch,
    augment_with_masks,
    check_precision,
    cpu_has_bf16,
    epoch_order,
    has_confluence,
    has_coverage,
    instance_targets,
    use_bf16,
)
from .classifier import (
    ClassifierLoss,
    EarlyStopping,
    balanced_weights,
    classification_batches,
    confluence_from_outputs,
    dihedral_view,
    evaluate,
    predict,
    train_one_epoch,
    view_mean,
    warmup_cosine,
    weight_average,
)
from .detector import (
    anchor_plan,
    detection_batches,
    detection_map,
    predict_detections,
    rank_slice,
    train_detector_epoch,
)
from .instances import (
    AREA_EDGES,
    SCORE_GRID,
    _instance_record,
    choose_count_thresholds,
    count_error,
    coverage_mae,
    instance_box_ap,
    instance_counts,
    mask_ap_metric,
    mask_ap_summary,
    predict_instances,
    recall_by_area,
)

__all__ = [
    "AREA_EDGES",
    "Augmenter",
    "Cache",
    "ClassifierLoss",
    "EarlyStopping",
    "PRECISIONS",
    "SCORE_GRID",
    "_instance_record",
    "anchor_plan",
    "augment_batch",
    "augment_with_masks",
    "balanced_weights",
    "check_precision",
    "choose_count_thresholds",
    "classification_batches",
    "confluence_from_outputs",
    "count_error",
    "coverage_mae",
    "cpu_has_bf16",
    "detection_batches",
    "detection_map",
    "dihedral_view",
    "epoch_order",
    "evaluate",
    "has_confluence",
    "has_coverage",
    "instance_box_ap",
    "instance_counts",
    "instance_targets",
    "mask_ap_metric",
    "mask_ap_summary",
    "predict",
    "predict_detections",
    "predict_instances",
    "recall_by_area",
    "rank_slice",
    "train_detector_epoch",
    "train_one_epoch",
    "use_bf16",
    "view_mean",
    "warmup_cosine",
    "weight_average",
]
