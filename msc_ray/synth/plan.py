"""Hidden biology, potency, and the plan of a corpus: vessels, days, positions and target confluences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import BAND_EDGES, STACKS

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
