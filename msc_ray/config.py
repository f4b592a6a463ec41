"""Frozen configuration dataclasses shared by the jobs. Each is saved beside every checkpoint and
artifact (``asdict`` → JSON) and rebuilt from it with :func:`from_dict`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from .images import DEFAULT_MAX_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    """How images become model input: decode → (equalise) → resize → augment (train) → normalise.

    ``channels`` is what the model takes: grayscale images are repeated to 3 channels for
    ImageNet-style backbones, colour images are averaged to 1 for a 1-channel model.
    ``mean``/``std`` empty means ImageNet statistics for 3 channels and (0.5, 0.25) for 1."""

    size: int = 128
    channels: int = 3
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    equalize: bool = False  # histogram equalisation: on for multi-stack images
    rotation: float = 15.0  # degrees of the random small rotation, on top of a random quarter turn
    tilt_share: float = 0.5  # share of training samples that get the small rotation (see augment.RotateCrop)
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    endpoint_url: str | None = None
    decode_batch: int = 0  # images per Ray Data task; 0: data.block_rows's rule from the split and the cluster's CPUs

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.decode_batch < 0:
            raise ValueError(
                f"decode_batch must be 0 (chosen from the cluster) or a number of images, got {self.decode_batch}"
            )
        if not 0.0 <= self.tilt_share <= 1.0:
            raise ValueError(f"tilt_share must lie in [0, 1], got {self.tilt_share}")

    @property
    def norm_mean(self) -> tuple[float, ...]:
        return self.mean or (IMAGENET_MEAN if self.channels == 3 else (0.5,))

    @property
    def norm_std(self) -> tuple[float, ...]:
        return self.std or (IMAGENET_STD if self.channels == 3 else (0.25,))


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Rebuild a config dataclass, ignoring keys it does not know and turning lists back to tuples."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**kwargs)
