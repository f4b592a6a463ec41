"""Synthetic phase-contrast MSC corpus with exact ground truth.

Every image is drawn from an explicit cell list, so its truth is exact: the instance mask says which
cell covers each pixel, the confluence is the mask's covered fraction, and every abnormal cell has a
tight box. Output follows the corpus layout of DESIGN.md::

    <out>/<stack>/<class>/<image>                 class folders "1".."4" (0-40, 40-60, 60-80, 80-100 %)
    <out>/<stack>/annotations/<stem>.xml          Pascal VOC, one per single-stack image (may hold no object)
    <out>/masks/<stack>/<stem>.png                16-bit instance mask of cells, 0 = background
    <out>/masks/<stack>/nuclei/<stem>.png         16-bit nucleus mask: a nucleus has its cell's id
    <out>/metadata.csv                            image, vessel, day, position, confluence, potency
    <out>/truth.parquet                           exact per-image truth, with the hidden biology

**Hidden biology and potency.** Each vessel has hidden biology that drives what is drawn (see
:class:`Biology`): how elongated its spindle cells are, their size, the nucleus/cell ratio, and a
propensity to flatten that rises with the day (enlarged, flattened cells — the abnormal cells — appear
in more images, more of them per image, and the spindles shorten). Its potency per vessel-day, an
IDO-activity-like score in arbitrary units, is a documented function of that biology plus assay
noise (:func:`potency_of`). Same seed, same bytes.

VOC boxes use the VOC convention (1-based, inclusive); in the truth table and everywhere in the
code a box is ``[x1, y1, x2, y2]`` in pixel-edge coordinates (x2 = last column + 1).
"""

from __future__ import annotations

from .plan import (
    BROAD_SHARE,
    BROAD_WIDTH,
    DAYS_PER_VESSEL,
    FORMATS,
    POSITIONS,
    POTENCY_NOISE,
    STACK_CHOICES,
    Biology,
    ImageSpec,
    SynthConfig,
    band_of,
    biology_on,
    plan_corpus,
    potency_of,
    vessel_biology,
)
from .preview import preview
from .render import (
    render,
)
from .write import synthesize

__all__ = [
    "FORMATS",
    "STACK_CHOICES",
    "POSITIONS",
    "DAYS_PER_VESSEL",
    "POTENCY_NOISE",
    "BROAD_SHARE",
    "BROAD_WIDTH",
    "Biology",
    "vessel_biology",
    "biology_on",
    "potency_of",
    "SynthConfig",
    "ImageSpec",
    "band_of",
    "plan_corpus",
    "render",
    "synthesize",
    "preview",
]
