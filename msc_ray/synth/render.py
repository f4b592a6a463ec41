"""Drawing one image and its exact instance masks from an explicit cell list."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .plan import BROAD_SHARE, BROAD_WIDTH, Biology, ImageSpec


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
