"""The main job end to end on embedded defaults: what ``scripts/quickstart`` runs.

synthetic corpus → index (grouped 5-fold) → classifier search on Ray Tune (two small backbones, five
outer folds, nested early stopping) → abnormal-cell detector on Ray Train (RetinaNet, two DDP workers)
→ cell/nucleus segmenter on Ray Train (U-Net + watershed, two DDP workers, a subset of the vessels) →
morphology of the training images from its masks → potency model (LightGBM on Ray Tune, nested by
vessel) → scoring an archive of new vessels (another seed) that includes broken files, with every
model → report counts and plots → the archive's predictions against the truth of its images
(``heldout_metrics.json``).
Every step writes under one output folder; the paths worth opening are returned and printed.
"""

from __future__ import annotations

from .config import QuickstartConfig
from .judge import heldout_lines, heldout_metrics, judge, morphology_metrics
from .run import run
from .steps import (
    make_corpora,
    score_heldout,
    train_abnormal_detector,
    train_cell_segmenter,
    train_classifier,
    train_potency_model,
)

__all__ = [
    "QuickstartConfig",
    "make_corpora",
    "train_classifier",
    "train_abnormal_detector",
    "train_cell_segmenter",
    "train_potency_model",
    "score_heldout",
    "heldout_metrics",
    "morphology_metrics",
    "judge",
    "heldout_lines",
    "run",
]
