"""The quickstart's embedded defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuickstartConfig:
    out: str = "quickstart-out"
    n: int = 480  # synthetic single-stack training images: 16 vessels × up to 6 days × 5 positions
    # images of new vessels (another seed) in the archive that is scored: 400, so that the held-out figures
    # are read to about ±1.5 points and the ECE's upward bias on few images (what a perfectly calibrated
    # model would show: 0.043 on 200 images) is smaller than the 0.05 it is held to
    heldout_n: int = 400
    size: int = 128  # stored image side (the detector's input)
    input_size: int = 64  # classifier input side: confluence is a low-frequency property
    backbones: tuple[str, ...] = ("coverage_unet", "compact_cnn")  # confluence read from a pixel map, or pooled
    folds: int = 5
    max_epochs: int = 16
    patience: int = 4
    lr: float = 2e-3
    detector_folds: tuple[int, ...] = (0,)  # outer folds the detector's Table 2 covers (~3 min each)
    detector_epochs: int = 12
    segmenter_images: int = 96  # spread over every vessel; the segmenter trains and is judged on these
    segmenter_size: int = 128  # the stored side: nuclei are a few pixels wide
    segmenter_epochs: int = 10
    # test-time views of the segmenter's maps: four here (train-segmenter's default is eight, chosen on other
    # new vessels, README). Eight fit the 10 minutes with 200 held-out images; with 400 the run took 10.8
    # minutes on a slow day, and four views cost the quickstart's figures little (measured: count error 0.144
    # against 0.142, potency R² 0.601 against 0.626 on 200 images)
    segmenter_views: int = 4
    potency_samples: int = 4  # LightGBM parameter sets
    seed: int = 0
    heldout_seed: int = 2026  # never looked at while choosing the recipe (those experiments used seed 1000)
