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

import csv
import logging
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from . import ABNORMAL_LABEL, BAND_EDGES, BAND_NAMES, STACKS

log = logging.getLogger(__name__)

FORMATS = ("png", "jpg", "tif")
STACK_CHOICES = ("sstack", "mstack", "both")
POSITIONS = ("tl", "tr", "bl", "br", "c")  # four corners and the centre of the flask
DAYS_PER_VESSEL = 6
POTENCY_NOISE = 1.5  # SD of the assay noise added to the potency formula
BROAD_SHARE = 0.3  # at flattening 1, this share of the normal cells is drawn spread out ...
BROAD_WIDTH = 2.6  # ... that many times as wide (area × 2.6, aspect ratio ÷ 2.6)


@dataclass(frozen=True)
class Biology:
    """A vessel's hidden biology on one day (drawn per vessel; elongation and flattening drift with
    the day as the culture ages).

    - ``elongation``: spindle aspect-ratio factor (long axis × √e, short axis ÷ √e; area unchanged);
    - ``size``: cell-area factor (both axes × √s);
    - ``nucleus``: nucleus/cell area-ratio factor (both nucleus axes × √n);
    - ``flattening`` in [0, 1]: a share ``BROAD_SHARE · flattening`` of the normal cells is drawn
      spread out (``BROAD_WIDTH`` times as wide); the chance that an image holds abnormal (enlarged,
      flattened, 4–8× area, low-contrast) cells is ``1 − (1 − abnormal_fraction)^(2·flattening)``,
      and such an image holds ``1 + Binomial(3, flattening)`` of them."""

    elongation: float
    size: float
    nucleus: float
    flattening: float


def vessel_biology(seed: int, stack_index: int, n_vessels: int) -> list[tuple[float, float, float, float]]:
    """Per vessel (elongation on day 1, size, nucleus, flattening on day 1), from its own stream so
    the corpus plan (bands, days, positions) does not depend on it."""
    rng = np.random.default_rng([seed, 2000 + stack_index])
    return [
        (rng.uniform(0.75, 1.4), rng.uniform(0.85, 1.2), rng.uniform(0.8, 1.3), rng.uniform(0.0, 0.8))
        for _ in range(n_vessels)
    ]


def biology_on(vessel: tuple[float, float, float, float], day: int) -> Biology:
    """A vessel's biology on ``day`` (1-based): per day in culture the spindles lose 0.02 of
    elongation and the flattening propensity rises by 0.05."""
    e, s, n, f = vessel
    return Biology(elongation=e - 0.02 * (day - 1), size=s, nucleus=n, flattening=min(f + 0.05 * (day - 1), 1.0))


def potency_of(b: Biology, noise: float) -> float:
    """The documented potency formula (arbitrary units, IDO-activity-like): elongated spindle cells
    are the potent ones, flattening and large nuclei cost potency, bigger cells add a little::

        potency = 50 + 30·(elongation − 1) − 20·flattening − 16·(nucleus − 1) + 10·(size − 1) + noise

    with ``noise`` ~ N(0, POTENCY_NOISE²) per vessel-day."""
    return 50 + 30 * (b.elongation - 1) - 20 * b.flattening - 16 * (b.nucleus - 1) + 10 * (b.size - 1) + noise


@dataclass(frozen=True)
class SynthConfig:
    """Options of one synthesis run; saved beside the corpus as ``synth_config.json``."""

    n: int = 40  # images per stack
    size: int = 512
    stack: str = "both"
    fmt: str = "png"
    seed: int = 0
    abnormal_fraction: float = 0.3  # share of single-stack images holding abnormal cells
    workers: int = 1

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be at least 1, got {self.n}")
        if not 32 <= self.size <= 4096:
            raise ValueError(f"--size must be between 32 and 4096 pixels, got {self.size}")
        if self.stack not in STACK_CHOICES:
            raise ValueError(f"--stack must be one of {', '.join(STACK_CHOICES)}, got {self.stack!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.fmt!r}")
        if not 0.0 <= self.abnormal_fraction <= 1.0:
            raise ValueError(f"abnormal fraction must lie in [0, 1], got {self.abnormal_fraction}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")

    @property
    def stacks(self) -> tuple[str, ...]:
        return STACKS if self.stack == "both" else (self.stack,)


@dataclass(frozen=True)
class ImageSpec:
    """What one image should show; everything random about it derives from ``key``."""

    stack: str
    index: int
    vessel: str
    day: int
    position: str
    target: float  # confluence the renderer aims at; the truth is measured on the mask
    n_abnormal: int
    key: tuple[int, ...]
    biology: Biology = Biology(1.0, 1.0, 1.0, 0.0)
    potency: float = float("nan")  # the vessel-day's potency (formula plus assay noise)

    @property
    def stem(self) -> str:
        return f"{self.vessel}_d{self.day:02d}_{self.position}"


def band_of(confluence: float) -> int:
    """Confluence fraction in [0, 1] → class 1..4 (a value on an edge goes to the upper band)."""
    return int(np.searchsorted(np.asarray(BAND_EDGES[1:-1]), confluence, side="right")) + 1


# --------------------------------------------------------------------------------------------------
# Planning: vessels, days, positions and target confluences
# --------------------------------------------------------------------------------------------------


def plan_corpus(cfg: SynthConfig) -> list[ImageSpec]:
    """Lay out ``cfg.n`` images per stack as vessels × consecutive days × five positions.

    Each vessel-day gets one base confluence; bands are dealt round-robin over vessel-days so every
    band is populated, a third of vessel-days sit within 3 points of a band edge, and the five
    positions scatter a few points around the base (so a vessel-day's images are correlated and can
    straddle an edge). Within a vessel, confluence rises with the day, as a growing culture does.
    """
    specs: list[ImageSpec] = []
    for s_idx, stack in enumerate(cfg.stacks):
        rng = np.random.default_rng([cfg.seed, 1000 + s_idx])
        n_units = math.ceil(cfg.n / len(POSITIONS))
        bands = np.arange(n_units) % 4
        rng.shuffle(bands)
        bases = np.empty(n_units)
        for u, b in enumerate(bands):
            lo, hi = BAND_EDGES[b], BAND_EDGES[b + 1]
            lo, hi = max(lo, 0.06), min(hi, 0.95)
            if rng.random() < 1 / 3:  # near a band edge, where classes 2 and 3 get confused
                edges = [e for e in (0.4, 0.6, 0.8) if lo - 0.01 <= e <= hi + 0.01]
                e = edges[rng.integers(len(edges))]
                bases[u] = np.clip(e + rng.uniform(-0.03, 0.03), 0.06, 0.95)
            else:
                bases[u] = rng.uniform(lo, hi)
        # enough vessels for grouped 5-fold cross-validation, and several days per vessel when possible
        days = max(1, min(DAYS_PER_VESSEL, n_units // 5))
        n_vessels = math.ceil(n_units / days)
        unit_vessel = rng.permutation(np.arange(n_units) % n_vessels)
        hidden = vessel_biology(cfg.seed, s_idx, n_vessels)
        assay = np.random.default_rng([cfg.seed, 3000 + s_idx]).normal(0, POTENCY_NOISE, (n_vessels, n_units + 1))
        prefix = "S" if stack == "sstack" else "M"
        i = 0
        for v in range(n_vessels):
            units = np.flatnonzero(unit_vessel == v)
            for day, u in enumerate(sorted(units, key=lambda k: bases[k])):
                bio = biology_on(hidden[v], day + 1)
                p_abnormal = 1 - (1 - cfg.abnormal_fraction) ** (2 * bio.flattening)
                for p_idx, pos in enumerate(POSITIONS):
                    if i >= cfg.n:
                        break
                    target = float(np.clip(bases[u] + rng.normal(0, 0.025), 0.03, 0.97))
                    n_abn = 0
                    if stack == "sstack" and rng.random() < p_abnormal:
                        n_abn = 1 + int(rng.binomial(3, bio.flattening))
                    specs.append(
                        ImageSpec(
                            stack=stack,
                            index=i,
                            vessel=f"{prefix}{v + 1:03d}",
                            day=day + 1,
                            position=pos,
                            target=target,
                            n_abnormal=n_abn,
                            key=(cfg.seed, s_idx, v, day, p_idx),
                            biology=bio,
                            potency=potency_of(bio, float(assay[v, day])),
                        )
                    )
                    i += 1
    return specs


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


class _Canvas:
    """Label map plus per-pixel intensity of one cell layer, drawn cell by cell as polygons.

    The label image (PIL mode "I") is the truth: whatever a later cell covers is that cell's pixel.
    Nuclei are drawn with their cell's id into a second label image; :attr:`nuclei` keeps the nucleus
    pixels that are still their own cell's."""

    _T = np.linspace(-1.0, 1.0, 17)
    _PHI = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)

    def __init__(self, size: int):
        self.size = size
        self._label = Image.new("I", (size, size), 0)
        self._body = Image.new("F", (size, size), 0.0)  # intensity offset from background
        self._nuclei = Image.new("I", (size, size), 0)
        self._dl = ImageDraw.Draw(self._label)
        self._db = ImageDraw.Draw(self._body)
        self._dn = ImageDraw.Draw(self._nuclei)
        self.n_cells = 0
        self.halo_weight = [0.0]  # per label id: how bright the phase halo around that cell is
        self.abnormal_ids: list[int] = []

    @property
    def label(self) -> np.ndarray:
        """(H, W) uint16 instance ids, 0 = background."""
        return np.asarray(self._label).astype(np.uint16)

    @property
    def nuclei(self) -> np.ndarray:
        """(H, W) uint16: a visible nucleus pixel holds its cell's id, 0 elsewhere."""
        lab, nuc = np.asarray(self._label), np.asarray(self._nuclei)
        return np.where((nuc == lab) & (lab > 0), nuc, 0).astype(np.uint16)

    @property
    def body(self) -> np.ndarray:
        return np.asarray(self._body, dtype=np.float32)

    def covered(self) -> int:
        return int(np.count_nonzero(np.asarray(self._label)))

    def is_free(self, x: float, y: float) -> bool:
        return self._label.getpixel((int(x), int(y))) == 0

    def _new_id(self, halo: float) -> int:
        self.n_cells += 1
        self.halo_weight.append(halo)
        return self.n_cells

    @staticmethod
    def _place(u: np.ndarray, v: np.ndarray, cx: float, cy: float, c: float, s: float) -> list[tuple]:
        return list(zip((cx + u * c - v * s).tolist(), (cy + u * s + v * c).tolist(), strict=True))

    def spindle(
        self, cx: float, cy: float, a: float, b: float, theta: float, r: np.ndarray, nucleus: float = 1.0
    ) -> int:
        """A fibroblast-like spindle: half-length ``a``, half-width ``b`` (px), long axis at ``theta``;
        ``nucleus`` scales the nucleus's area relative to the cell's.

        ``r`` holds 7 uniform [0, 1) draws that shape it (bend, wobble, tone, fibres, nucleus)."""
        c, s = math.cos(theta), math.sin(theta)
        t = self._T
        bend = (r[0] - 0.5) * 0.5 * a * t * t
        half = b * (1 - t * t) * (1 + 0.18 * np.sin((2 + 4 * r[1]) * t + 6.3 * r[2]))
        u = np.concatenate([a * t, a * t[::-1]])
        v = np.concatenate([bend + half, (bend - half)[::-1]])
        cid = self._new_id(1.0)
        outline = self._place(u, v, cx, cy, c, s)
        self._dl.polygon(outline, fill=cid)
        self._db.polygon(outline, fill=float(-0.095 + 0.05 * r[3]))
        # stress fibres along the long axis
        for k, off in enumerate((-0.45, 0.0, 0.45)):
            tt = t[3:-3]
            fv = bend[3:-3] + off * half[3:-3]
            self._db.line(self._place(a * tt, fv, cx, cy, c, s), fill=float(-0.06 - 0.03 * ((r[4] + k / 3) % 1)))
        # a darker nucleus with a bright nucleolus near the middle
        un = 0.3 * (r[5] - 0.5) * a
        k = math.sqrt(nucleus)
        an, bn = max(0.2 * a * k, 1.2), max(0.55 * b * k, 1.0)
        ph = self._PHI[::4]
        nucleus_outline = self._place(un + an * np.cos(ph), bn * np.sin(ph), cx, cy, c, s)
        self._db.polygon(nucleus_outline, fill=-0.2)
        self._dn.polygon(nucleus_outline, fill=cid)
        self._db.polygon(self._place(un + 0.28 * an * np.cos(ph), 0.28 * bn * np.sin(ph), cx, cy, c, s), fill=0.08)
        return cid

    def flattened(self, rng: np.random.Generator, cx: float, cy: float, radius: float) -> int:
        """An enlarged, flattened, irregular cell: low contrast, weak halo, big visible nucleus."""
        aspect = rng.uniform(0.65, 1.0)
        theta = rng.uniform(0, math.pi)
        c, s = math.cos(theta), math.sin(theta)
        phi = self._PHI
        rad = np.full_like(phi, radius)
        for k in range(2, 7):
            rad = rad + radius * rng.uniform(0.02, 0.11) * np.cos(k * phi + rng.uniform(0, 6.3))
        cid = self._new_id(0.3)
        outline = self._place(rad * np.cos(phi), aspect * rad * np.sin(phi), cx, cy, c, s)
        self._dl.polygon(outline, fill=cid)
        self._db.polygon(outline, fill=float(-0.025 + rng.normal(0, 0.006)))
        # faint granular texture: a few low-contrast rings
        for k in range(1, 4):
            ring = self._place(k / 4 * rad * np.cos(phi), k / 4 * aspect * rad * np.sin(phi), cx, cy, c, s)
            self._db.line(ring + ring[:1], fill=-0.012)
        nu = rng.uniform(-0.2, 0.2) * radius
        rn = radius * rng.uniform(0.2, 0.28)
        nucleus_outline = self._place(nu + rn * np.cos(phi), rn * np.sin(phi), cx, cy, c, s)
        self._db.polygon(nucleus_outline, fill=-0.16)
        self._dn.polygon(nucleus_outline, fill=cid)
        self.abnormal_ids.append(cid)
        return cid

    def boxes(self, label: np.ndarray) -> list[tuple[int, int, int, int]]:
        """Tight ``[x1, y1, x2, y2]`` boxes (pixel edges) of the abnormal cells, in id order."""
        out = []
        for sl, cid in zip(
            ndimage.find_objects(label, max_label=self.n_cells), range(1, self.n_cells + 1), strict=True
        ):
            if cid in self.abnormal_ids and sl is not None:
                out.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
        return out


def _orientation_field(rng: np.random.Generator, size: int) -> Callable[[float, float], float]:
    """A smooth angle field: the direction of the parallel streams cells align into."""
    th0 = rng.uniform(0, math.pi)
    waves = [
        (
            rng.uniform(0.3, 0.8),
            rng.uniform(0.5, 2.0) / size,
            rng.uniform(0.5, 2.0) / size,
            rng.uniform(0, 6.3),
        )
        for _ in range(2)
    ]

    def field(x: float, y: float) -> float:
        return th0 + sum(A * math.sin(2 * math.pi * (kx * x + ky * y) + ph) for A, kx, ky, ph in waves)

    return field


def _cell_layer(
    rng: np.random.Generator, size: int, target: float, n_abnormal: int = 0, bio: Biology | None = None
) -> _Canvas:
    """Draw normal spindle cells until the covered fraction reaches ``target``, then abnormal cells;
    ``bio`` shapes them (default: the neutral biology)."""
    bio = bio or Biology(1.0, 1.0, 1.0, 0.0)
    canvas = _Canvas(size)
    scale = size / 512
    total = size * size
    field = _orientation_field(rng, size)
    spread = 0.12 + 1.2 * (1 - target) ** 2  # orientation noise: random when sparse, streams when dense
    long_k, short_k = math.sqrt(bio.size * bio.elongation), math.sqrt(bio.size / bio.elongation)
    normal_area = (8 / 3) * 65 * 12 * scale * scale * bio.size  # spindle area (8/3)·a·b at the mean a, b
    abn_radii = [math.sqrt(rng.uniform(4, 8) * normal_area / math.pi) for _ in range(n_abnormal)]
    # abnormal cells are a minority of the covered area: drop those that would crowd out normal cells
    while abn_radii and sum(math.pi * r * r * 0.8 for r in abn_radii) > 0.5 * target * total:
        abn_radii.pop()
    abn_area = sum(math.pi * r * r * 0.8 for r in abn_radii)
    goal = max(target * total - abn_area, 0)
    draws = rng.random((4096, 2)) * size
    d = 0
    block, k = np.empty((0, 11)), 0
    covered, since = 0, 0
    cell_area = normal_area * (1 + 0.4 * target) * (1 - 0.3 * target)
    while covered < goal and canvas.n_cells < 20000:
        # prefer uncovered spots: a few cheap tries, then take what comes
        for _ in range(40):
            if d >= len(draws):
                draws, d = rng.random((4096, 2)) * size, 0
            cx, cy = draws[d]
            d += 1
            if canvas.is_free(cx, cy):
                break
        if k >= len(block):  # per-cell parameters, drawn in bulk
            block, k = rng.random((256, 11)), 0
            block[:, 9] = rng.standard_normal(256)
        p = block[k]
        k += 1
        a = (45 + 40 * p[7]) * scale * (1 + 0.4 * target) * long_k
        b = max((9 + 6 * p[8]) * scale * (1 - 0.3 * target) * short_k, 1.5)
        if p[10] < BROAD_SHARE * bio.flattening:  # a spread-out, flattened MSC (not an abnormal giant)
            b *= BROAD_WIDTH
        canvas.spindle(cx, cy, a, b, field(cx, cy) + spread * p[9], p, bio.nucleus)
        since += 1
        # count covered pixels every few cells, and after every cell once close to the goal
        if since >= 16 or covered + (since + 1) * cell_area >= goal:
            covered, since = canvas.covered(), 0
    placed: list[tuple[float, float, float]] = []
    for radius in abn_radii:
        for _ in range(30):
            # away from the border so each is seen whole, and apart from each other so boxes stay exact
            cx, cy = rng.uniform(radius * 1.3, max(size - radius * 1.3, radius * 1.3 + 1), 2)
            if any(math.hypot(cx - px, cy - py) < 1.45 * (radius + pr) for px, py, pr in placed):
                continue
            canvas.flattened(rng, cx, cy, radius)
            placed.append((cx, cy, radius))
            break
    return canvas


def _shade(lab: np.ndarray, canvas: _Canvas, scale: float) -> np.ndarray:
    """Phase-contrast rendering of a cell layer: body intensities, bright halos, bright cell borders."""
    weight = np.asarray(canvas.halo_weight, np.float32)[lab]
    blurred = ndimage.gaussian_filter(weight, sigma=max(1.6 * scale, 0.7), mode="nearest")
    halo = np.clip(blurred - weight, 0, None)
    border = np.zeros_like(weight)
    border[:, 1:] += (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    border[1:, :] += (lab[1:, :] != lab[:-1, :]) & (lab[1:, :] > 0) & (lab[:-1, :] > 0)
    img = 0.55 + canvas.body + 0.9 * halo + 0.06 * np.minimum(border, 1)
    return ndimage.gaussian_filter(img, sigma=max(0.6 * scale, 0.4), mode="nearest")


def _illumination(rng: np.random.Generator, size: int) -> np.ndarray:
    """Uneven illumination: vignetting around an off-centre optical axis plus a linear gradient."""
    y, x = np.ogrid[0:size, 0:size]
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (size * size)
    gx, gy = rng.uniform(-0.12, 0.12, 2)
    return (1.0 - rng.uniform(0.2, 0.45) * r2 + gx * (x / size - 0.5) + gy * (y / size - 0.5)).astype(np.float32)


def _out_of_focus_layer(rng: np.random.Generator, size: int, target: float, bio: Biology) -> np.ndarray:
    """Another layer of a stacked vessel, defocused: drawn at quarter resolution (the blur removes
    the detail a full-resolution drawing would add) and blurred."""
    small = max(size // 4, 16)
    canvas = _cell_layer(rng, small, target, bio=bio)
    img = _shade(canvas.label, canvas, small / 512)
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(2.0, 4.0) * small / 256)
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def _clumps(rng: np.random.Generator, size: int, density: float) -> np.ndarray:
    """Dark cell clumps of a multi-layer culture: soft dark blobs, more of them when dense."""
    out = np.zeros((size, size), np.float32)
    scale = size / 512
    for _ in range(int(rng.poisson(1 + 5 * density))):
        r = rng.uniform(6, 22) * scale
        cx, cy = rng.uniform(0, size, 2)
        x0, x1 = max(int(cx - 3 * r), 0), min(int(cx + 3 * r) + 2, size)
        y0, y1 = max(int(cy - 3 * r), 0), min(int(cy + 3 * r) + 2, size)
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        out[y0:y1, x0:x1] -= rng.uniform(0.15, 0.3) * np.exp(-(dx * dx + dy * dy) / (2 * r * r))
    return out


def render(spec: ImageSpec, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render one image.

    Returns ``(image, mask, truth)``: image float32 (H, W) in [0, 1]; mask uint16 (H, W) instance ids
    of the in-focus layer (0 = background); truth a dict with ``confluence`` (covered fraction of the
    mask), ``cell_count`` (cells with at least one visible pixel), ``boxes`` (``[x1, y1, x2, y2]``,
    pixel edges, abnormal cells only), ``abnormal_ids`` (their ids in the mask, same order) and
    ``nuclei`` (uint16 (H, W): each visible nucleus pixel holds its cell's id).
    """
    rng = np.random.default_rng(list(spec.key))
    scale = size / 512
    canvas = _cell_layer(rng, size, spec.target, spec.n_abnormal, spec.biology)
    mask = canvas.label
    img = _shade(mask, canvas, scale)
    if spec.stack == "mstack":
        layers = [
            _out_of_focus_layer(rng, size, float(np.clip(spec.target + rng.normal(0, 0.08), 0.03, 0.97)), spec.biology)
            for _ in range(int(rng.integers(1, 3)))
        ]
        img = 0.6 * img + 0.4 * np.mean(layers, axis=0)
        img = 0.55 + 0.6 * (img - 0.55)  # stacked layers lower the contrast
        img = img + _clumps(rng, size, spec.target)
    img = img * _illumination(rng, size)
    # sensor: shot noise (variance ∝ signal) and read noise
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img + noise * np.sqrt(np.clip(img, 0, None) * 4e-4 + 1e-4), 0, 1).astype(np.float32)
    confluence = float(np.count_nonzero(mask)) / mask.size
    truth = {
        "confluence": confluence,
        "cell_count": int(np.count_nonzero(np.bincount(mask.ravel())[1:])),  # cells with a visible pixel
        "boxes": canvas.boxes(mask),
        "abnormal_ids": canvas.abnormal_ids,
        "nuclei": canvas.nuclei,
    }
    return img, mask, truth


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _voc_xml(filename: str, size: int, boxes: list[tuple[int, int, int, int]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    sz = ET.SubElement(root, "size")
    for tag, val in (("width", size), ("height", size), ("depth", 1)):
        ET.SubElement(sz, tag).text = str(val)
    for x1, y1, x2, y2 in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = ABNORMAL_LABEL
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        # VOC: 1-based inclusive pixel indices
        for tag, val in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bb, tag).text = str(val)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _write_image(path: Path, img: np.ndarray, fmt: str) -> None:
    if fmt == "png":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, compress_level=1)
    elif fmt == "jpg":
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(path, quality=92)
    else:  # 16-bit TIFF, as microscope cameras write
        import tifffile

        tifffile.imwrite(path, np.round(img * 65535).astype(np.uint16), photometric="minisblack")


def _make_one(args: tuple[ImageSpec, SynthConfig, str]) -> dict:
    spec, cfg, out = args
    root = Path(out)
    img, mask, truth = render(spec, cfg.size)
    cls = band_of(truth["confluence"])
    rel = f"{spec.stack}/{BAND_NAMES[cls - 1]}/{spec.stem}.{cfg.fmt}"
    _write_image(root / rel, img, cfg.fmt)
    mask_rel = f"masks/{spec.stack}/{spec.stem}.png"
    Image.fromarray(mask).save(root / mask_rel, compress_level=1)  # uint16 → 16-bit PNG
    Image.fromarray(truth["nuclei"]).save(root / f"masks/{spec.stack}/nuclei/{spec.stem}.png", compress_level=1)
    if spec.stack == "sstack":
        xml = _voc_xml(Path(rel).name, cfg.size, truth["boxes"])
        (root / spec.stack / "annotations" / f"{spec.stem}.xml").write_bytes(xml)
    return {
        "image": rel,
        "stack": spec.stack,
        "class": cls,
        "label": BAND_NAMES[cls - 1],
        "confluence": truth["confluence"],
        "target_confluence": spec.target,
        "cell_count": truth["cell_count"],
        "n_abnormal": len(truth["boxes"]),
        "boxes": [list(b) for b in truth["boxes"]],
        "abnormal_ids": truth["abnormal_ids"],
        "vessel": spec.vessel,
        "day": spec.day,
        "position": spec.position,
        "mask": mask_rel,
        "nucleus_mask": f"masks/{spec.stack}/nuclei/{spec.stem}.png",
        "elongation": spec.biology.elongation,
        "cell_size": spec.biology.size,
        "nucleus_factor": spec.biology.nucleus,
        "flattening": spec.biology.flattening,
        "potency": spec.potency,
        "width": cfg.size,
        "height": cfg.size,
    }


def _prepare_out(out: Path, cfg: SynthConfig) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stack in cfg.stacks:
            for name in BAND_NAMES:
                (out / stack / name).mkdir(parents=True, exist_ok=True)
            (out / "masks" / stack / "nuclei").mkdir(parents=True, exist_ok=True)
            if stack == "sstack":
                (out / stack / "annotations").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {out} is not writable: {exc.strerror or exc}") from None


def synthesize(
    out: str | os.PathLike, cfg: SynthConfig, progress: Callable[[Iterator], Iterator] | None = None
) -> list[dict]:
    """Write a synthetic corpus to ``out`` (a local folder) and return the truth rows.

    ``progress`` wraps the iterator of finished images (e.g. a progress bar)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg.validate()
    root = Path(out)
    _prepare_out(root, cfg)
    specs = plan_corpus(cfg)
    jobs = [(s, cfg, str(root)) for s in specs]
    if cfg.workers > 1:
        with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
            it = pool.map(_make_one, jobs, chunksize=4)
            rows = list(progress(it) if progress else it)
    else:
        it = map(_make_one, jobs)
        rows = list(progress(it) if progress else it)

    _write_metadata(root / "metadata.csv", rows)
    table = pa.Table.from_pylist(rows, schema=_truth_schema())
    pq.write_table(table, root / "truth.parquet")
    (root / "synth_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log.info("wrote %d images to %s", len(rows), root)
    return rows


def _write_metadata(path: Path, rows: list[dict]) -> None:
    """``metadata.csv``: per image the measured covered fraction, as an instrument's confluence export
    gives it, and the vessel-day's potency assay."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "vessel", "day", "position", "confluence", "potency"])
        for r in rows:
            w.writerow(
                [r["image"], r["vessel"], r["day"], r["position"], f"{r['confluence']:.4f}", f"{r['potency']:.3f}"]
            )


def _truth_schema():
    """The Arrow schema of ``truth.parquet``."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image", pa.string()),
            ("stack", pa.string()),
            ("class", pa.int8()),
            ("label", pa.string()),
            ("confluence", pa.float64()),
            ("target_confluence", pa.float64()),
            ("cell_count", pa.int32()),
            ("n_abnormal", pa.int8()),
            ("boxes", pa.list_(pa.list_(pa.int32(), 4))),
            ("abnormal_ids", pa.list_(pa.int32())),
            ("vessel", pa.string()),
            ("day", pa.int16()),
            ("position", pa.string()),
            ("mask", pa.string()),
            ("nucleus_mask", pa.string()),
            ("elongation", pa.float64()),
            ("cell_size", pa.float64()),
            ("nucleus_factor", pa.float64()),
            ("flattening", pa.float64()),
            ("potency", pa.float64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )


# --------------------------------------------------------------------------------------------------
# Preview
# --------------------------------------------------------------------------------------------------


def _load_for_preview(path: Path) -> np.ndarray:
    """Any written format (8-bit PNG/JPEG, 16-bit TIFF) → (H, W) uint8 for the contact sheet."""
    from .images import decode

    return np.round(decode(path.read_bytes(), path.name)[0] * 255).astype(np.uint8)


def preview(corpus: str | os.PathLike, rows: list[dict], dest: str | os.PathLike, tile: int = 256) -> Path:
    """A contact sheet: one example per (stack, class), abnormal boxes drawn in red.

    Prefers, per cell of the sheet, an image that holds abnormal cells, so boxes can be judged."""
    root = Path(corpus)
    stacks = [s for s in STACKS if any(r["stack"] == s for r in rows)]
    pad, head = 6, 22
    sheet = Image.new("RGB", (pad + 4 * (tile + pad), head + len(stacks) * (tile + head + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for si, stack in enumerate(stacks):
        for ci, name in enumerate(BAND_NAMES):
            cands = [r for r in rows if r["stack"] == stack and r["label"] == name]
            x0 = pad + ci * (tile + pad)
            y0 = head + si * (tile + head + pad)
            if not cands:
                draw.text((x0, y0 + tile // 2), f"{stack} class {name}: none", fill="black")
                continue
            cands.sort(key=lambda r: (-min(r["n_abnormal"], 1), abs(r["confluence"] - _band_mid(name))))
            r = cands[0]
            img = Image.fromarray(_load_for_preview(root / r["image"])).convert("RGB")
            sx = tile / img.width
            img = img.resize((tile, tile), Image.BILINEAR)
            d = ImageDraw.Draw(img)
            for x1, y1, x2, y2 in r["boxes"]:
                d.rectangle([x1 * sx, y1 * sx, x2 * sx - 1, y2 * sx - 1], outline=(255, 40, 40), width=2)
            sheet.paste(img, (x0, y0))
            draw.text(
                (x0, y0 - head + 6),
                f"{stack} class {name}  {100 * r['confluence']:.0f}%  {r['n_abnormal']} abnormal",
                fill="black",
            )
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest


def _band_mid(name: str) -> float:
    i = BAND_NAMES.index(name)
    return (BAND_EDGES[i] + BAND_EDGES[i + 1]) / 2
