"""A small generated corpus of another kind: neural-stem-cell fate, four classes, colour images.

Layout ``<root>/nsc/<class>/<vessel>_d<day>_<i>.png`` (the corpus layout of DESIGN.md, one stack named
``nsc``) and ``metadata.csv`` with vessels, so folds are grouped. Each class has its own cell shape and
stain, drawn with noise, rotation and varying counts so that a model has to look:

* neuron — small soma, two or three long thin neurites (green);
* astrocyte — star-shaped, many short thick processes (orange);
* oligodendrocyte — small soma with many fine short branches and a ring (magenta);
* undifferentiated — round, compact, tightly packed cells (grey-blue).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FATES = ("astrocyte", "neuron", "oligodendrocyte", "undifferentiated")
STAIN = {
    "neuron": (90, 220, 110),
    "astrocyte": (235, 150, 60),
    "oligodendrocyte": (210, 80, 200),
    "undifferentiated": (140, 160, 190),
}


def _cell(draw: ImageDraw.ImageDraw, fate: str, x: float, y: float, s: float, rng: np.random.Generator) -> None:
    c = tuple(int(np.clip(v + rng.normal(0, 18), 0, 255)) for v in STAIN[fate])
    a0 = rng.uniform(0, 2 * math.pi)
    if fate == "neuron":
        for k in range(rng.integers(2, 4)):
            a = a0 + k * 2 * math.pi / 3 + rng.normal(0, 0.3)
            ln = s * rng.uniform(3.0, 5.0)
            draw.line([(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))], fill=c, width=1)
        r = s * 0.6
    elif fate == "astrocyte":
        for k in range(8):
            a = a0 + k * math.pi / 4
            ln = s * rng.uniform(1.4, 2.0)
            draw.line([(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))], fill=c, width=3)
        r = s * 0.8
    elif fate == "oligodendrocyte":
        for k in range(12):
            a = a0 + k * math.pi / 6
            ln = s * rng.uniform(0.9, 1.4)
            draw.line([(x, y), (x + ln * math.cos(a), y + ln * math.sin(a))], fill=c, width=1)
        draw.ellipse([x - 1.6 * s, y - 1.6 * s, x + 1.6 * s, y + 1.6 * s], outline=c, width=1)
        r = s * 0.5
    else:
        r = s * rng.uniform(1.0, 1.3)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=c)


def image(fate: str, size: int, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(5, 35, 3)))
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(8, 14)) if fate == "undifferentiated" else int(rng.integers(3, 6))
    s = size / 24 * rng.uniform(0.8, 1.2)
    for _ in range(n):
        _cell(draw, fate, rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, s, rng)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img, np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def synthesize(root: Path, per_class: int = 24, size: int = 64, seed: int = 0, vessels: int = 6) -> list[dict]:
    """Write the corpus; returns one row per image (``path`` relative to ``root``, ``fate``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for fate in FATES:
        (root / "nsc" / fate).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            vessel = f"N{seed % 1000:03d}{i % vessels}"
            rel = f"nsc/{fate}/{vessel}_d{1 + i // vessels:02d}_{fate[:3]}{i}.png"
            image(fate, size, rng).save(root / rel)
            rows.append({"path": rel, "fate": fate, "vessel": vessel, "day": 1 + i // vessels})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "vessel", "day"])
        for r in rows:
            w.writerow([r["path"], r["vessel"], r["day"]])
    return rows
