"""The quickstart's embedded defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "quickstart-out"
    n: int = 480  # synthetic single-stack training images: 16 vessels × up to 6 days × 5 positions
    heldout_n: int = 200  # images of new vessels (another seed) in the archive that is scored
    size: int = 128  # stored image side (the detector's input)
    input_size: int = 64  # classifier input side: confluence is a low-frequency property
    backbones: tuple[str, ...] = ("compact_cnn", "mobilenet_v3_small")
    folds: int = 5
    max_epochs: int = 16
    patience: int = 4
    lr: float = 2e-3
    detector_folds: tuple[int, ...] = (0,)  # outer folds the detector's Table 2 covers (~3 min each)
    detector_epochs: int = 12
    segmenter_images: int = 96  # spread over every vessel; the segmenter trains and is judged on these
    segmenter_size: int = 128  # the stored side: nuclei are a few pixels wide
    segmenter_epochs: int = 10
    # test-time views of the segmenter's maps: eight, train-segmenter's default (chosen on other new vessels,
    # README). With float32 detector and segmenter training they took the run to 9.8 minutes and it kept
    # four; with their steps in bfloat16 eight fit (measured 7.0 minutes with four)
    segmenter_views: int = 8
    potency_samples: int = 4  # LightGBM parameter sets
    seed: int = 0
    heldout_seed: int = 2026  # never looked at while choosing the recipe (those experiments used seed 1000)
