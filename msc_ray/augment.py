"""The study's augmentations, box-aware, in one place (torchvision transforms v2 + tv_tensors).

Training recipe, after decoding to float (C, H, W) in [0, 1] and resizing to the model's input:

1. random rotation: a random quarter turn (exact), and in half the samples a small angle too, then the
   largest centred crop that holds no fill, resized back (fill would read as empty flask and bias
   confluence). The small angle resamples the pixels: applied to every sample it made every training
   image smoother than any image the model is scored on (see :class:`RotateCrop`);
2. horizontal flip, 3. vertical flip;
4. colour jitter: brightness and contrast (all a grayscale image has);
5. Gaussian blur;
6. sharpness enhancement: the smoothed image plus a scaled edge map (Laplacian), or
7. contrast enhancement: min–max intensity stretch — 6 and 7 with equal probability;
plus histogram equalisation first for multi-stack images (in training, validation and scoring alike).

Geometric steps move ``tv_tensors.BoundingBoxes`` (``XYXY``, pixels) with the pixels. Randomness is
drawn from torch's generator seeded per (seed, epoch, image), so a sample is reproducible.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .config import DataConfig


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A stable 63-bit seed for one (seed, epoch, image); the same on every machine and process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RotateCrop(v2.Transform):
    """Rotate by ``k·90°`` (exact), and with probability ``p_small`` by ``U(-degrees, degrees)`` more;
    after a small angle, crop the largest centred square free of fill and resize back. A box becomes
    the box of the ellipse it inscribes, rotated (cells are round-ish: the box around the rotated
    corners would be too big), clipped to the crop.

    A small angle interpolates every pixel (bilinear rotation, then the crop's upscaling): a low-pass
    filter. With ``p_small=1`` no training image kept its own sharpness, while validation and scoring
    images are never resampled, and multi-stack images — whose cells are faint one-pixel edges — read
    differently to the model at evaluation: trained on the rotation alone (no photometric steps), a
    compact CNN put plain images in one band (its own training images 0.23, validation 0.20) and
    classified the validation images at 0.55–0.66 once they were rotated too. ``p_small=0.5`` keeps
    half the samples pixel-exact: outer-fold multi-stack accuracy 0.762 / 0.800 against 0.575 / 0.706
    (two folds, 400 images, 30 epochs). The share is ``DataConfig.tilt_share``, a per-model setting: the
    classifier and the detector use 0.5, the segmenter 1.0."""

    def __init__(self, degrees: float = 15.0, p_small: float = 0.5):
        super().__init__()
        self.degrees = float(degrees)
        self.p_small = float(p_small)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        quarter = int(torch.randint(0, 4, ()).item())
        tilt = float(torch.rand(()).item()) < self.p_small
        small = float(torch.empty(()).uniform_(-self.degrees, self.degrees).item()) if tilt and self.degrees else 0.0
        return {"angle": 90.0 * quarter + small, "small": small}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            h, w = inpt.canvas_size
        elif isinstance(inpt, torch.Tensor) and inpt.ndim >= 2:
            h, w = inpt.shape[-2:]
        else:
            return inpt
        out = F.rotate(inpt, params["angle"], interpolation=v2.InterpolationMode.BILINEAR, expand=False)
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            out = _ellipse_extent(inpt, out, params["angle"])
        a = math.radians(abs(params["small"]))
        if a > 0:
            side = min(h, w) / (math.cos(a) + math.sin(a))
            crop = max(int(side), 1)
            out = F.center_crop(out, [crop, crop])
            out = F.resize(out, [h, w], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return out


def _ellipse_extent(before: tv_tensors.BoundingBoxes, rotated: tv_tensors.BoundingBoxes, angle: float):
    """Boxes of rotated *cells*: the rotated box's centre, with the extent of the ellipse inscribed in
    the original box rotated by ``angle`` (half-width sqrt(a²cos²θ + b²sin²θ), and so on). The box
    around a rotated box's corners grows with the angle (by up to 41 % per side at 45°) although a
    round cell's own box does not; training on those inflated targets taught the detector to draw
    boxes too big."""
    b = before.as_subclass(torch.Tensor).reshape(-1, 4).float()
    r = rotated.as_subclass(torch.Tensor).reshape(-1, 4).float()
    t = math.radians(angle)
    c, s = abs(math.cos(t)), abs(math.sin(t))
    hw, hh = (b[:, 2] - b[:, 0]) / 2, (b[:, 3] - b[:, 1]) / 2
    nw = torch.sqrt((hw * c) ** 2 + (hh * s) ** 2)
    nh = torch.sqrt((hw * s) ** 2 + (hh * c) ** 2)
    cx, cy = (r[:, 0] + r[:, 2]) / 2, (r[:, 1] + r[:, 3]) / 2
    boxes = torch.stack([cx - nw, cy - nh, cx + nw, cy + nh], dim=1).to(rotated.dtype)
    return tv_tensors.wrap(boxes.reshape(rotated.shape), like=rotated)


# The photometric steps' probabilities and ranges, shared by the per-image transforms and BatchAugment
JITTER_P, JITTER = 0.5, 0.25  # brightness and contrast factors in [1 - JITTER, 1 + JITTER]
BLUR_P, BLUR_KERNEL, BLUR_SIGMA = 0.3, 5, (0.1, 1.5)
ENHANCE_P = 0.5  # sharpness or contrast enhancement, each chosen equally often
SHARPEN_AMOUNT, SHARPEN_SIGMA = (0.5, 1.5), 0.8
_LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def _edge_map(smooth: torch.Tensor) -> torch.Tensor:
    """The Laplacian of (N, C, H, W) images, per channel, replicate padding (EdgeSharpen's edges)."""
    c = smooth.shape[1]
    lap = torch.tensor(_LAPLACIAN, dtype=smooth.dtype, device=smooth.device).expand(c, 1, 3, 3)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(smooth, (1, 1, 1, 1), mode="replicate"), lap, groups=c)


class EdgeSharpen(v2.Transform):
    """Sharpness enhancement: Gaussian-smoothed image plus ``amount`` × its edge map (negative
    Laplacian), clipped to [0, 1]. Boxes pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, amount: tuple[float, float] = SHARPEN_AMOUNT, sigma: float = SHARPEN_SIGMA):
        super().__init__()
        self.amount = amount
        self.sigma = sigma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"amount": float(torch.empty(()).uniform_(*self.amount).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        smooth = F.gaussian_blur(inpt, kernel_size=[BLUR_KERNEL, BLUR_KERNEL], sigma=[self.sigma, self.sigma])
        x = smooth.reshape(-1, *smooth.shape[-3:])
        out = (x - params["amount"] * _edge_map(x)).clamp_(0.0, 1.0).reshape(smooth.shape)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out


def geometric(cfg: DataConfig) -> list[v2.Transform]:
    return [RotateCrop(cfg.rotation, cfg.tilt_share), v2.RandomHorizontalFlip(0.5), v2.RandomVerticalFlip(0.5)]


def photometric() -> list[v2.Transform]:
    return [
        v2.RandomApply([v2.ColorJitter(brightness=JITTER, contrast=JITTER)], p=JITTER_P),
        v2.RandomApply([v2.GaussianBlur(kernel_size=BLUR_KERNEL, sigma=BLUR_SIGMA)], p=BLUR_P),
        # sharpness and contrast enhancement, each with the same probability
        v2.RandomApply([v2.RandomChoice([EdgeSharpen(), v2.RandomAutocontrast(p=1.0)])], p=ENHANCE_P),
    ]


def preprocess(cfg: DataConfig) -> list[v2.Transform]:
    """Deterministic steps shared by training, validation and scoring (before augmentation)."""
    steps: list[v2.Transform] = []
    if cfg.equalize:
        steps.append(v2.RandomEqualize(p=1.0))
    steps.append(v2.Resize([cfg.size, cfg.size], antialias=True))
    return steps


def build(cfg: DataConfig, *, train: bool, boxes: bool = False) -> v2.Compose:
    """The whole recipe: preprocess → (augment) → normalise. ``boxes`` adds box clean-up
    (clamping, dropping boxes that left the image) for detection samples."""
    steps = preprocess(cfg)
    if train:
        steps += geometric(cfg) + photometric()
    if boxes:
        steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2.0)]
    steps.append(v2.Normalize(list(cfg.norm_mean), list(cfg.norm_std)))
    return v2.Compose(steps)


def apply(transform: v2.Compose, sample: dict, seed: int) -> dict:
    """Run ``transform`` on ``sample`` with torch's CPU generator seeded by ``seed``, leaving it as it
    was. Only the CPU generator: ``torch.manual_seed`` also queues a seed for every accelerator
    backend, recording a stack trace for each (about 0.3 ms per image, more than decoding it)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(sample)


# --------------------------------------------------------------------------------------------------
# The same recipe on whole batches, on the training device
# --------------------------------------------------------------------------------------------------

N_DRAWS = 14  # uniform draws per sample, see BatchAugment.params


def _gauss_kernels(sigma: torch.Tensor, size: int = BLUR_KERNEL) -> torch.Tensor:
    """(B,) sigmas → (B, size) normalised 1-D Gaussian kernels (torchvision's gaussian_blur taps)."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def _blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of ``x`` (B, C, H, W) with one 1-D kernel per sample (B, k), reflect padding
    (as ``F.gaussian_blur``)."""
    b, c, h, w = x.shape
    k = kernels.shape[1]
    wgt = kernels.to(x.dtype).repeat_interleave(c, 0)  # (B*C, k): one group per (sample, channel)
    y = torch.nn.functional.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    y = torch.nn.functional.conv2d(y, wgt.view(b * c, 1, 1, k), groups=b * c)
    y = torch.nn.functional.conv2d(y, wgt.view(b * c, 1, k, 1), groups=b * c)
    return y.view(b, c, h, w)


class BatchAugment:
    """The training recipe of this module (:class:`RotateCrop`, flips, colour jitter, Gaussian blur,
    :class:`EdgeSharpen` or autocontrast) applied to a whole batch at once on whatever device the batch
    is on — for GPU training, where per-image transforms on the CPU left the GPU waiting (a resnet18
    trial at 224 px kept an H100 busy 8 % of the time).

    Same steps, probabilities and ranges as :func:`geometric` + :func:`photometric`; each sample's
    parameters are its own, drawn from ``numpy`` seeded by :func:`sample_seed` (seed, epoch, image), so
    a sample does not depend on its batch or device. The draws differ from the per-image path's (torch's
    generator inside each transform), so the two paths make different — equally distributed — samples;
    and the rotation, crop and resize are one bilinear resampling here (two there). Quarter turns and
    flips alone stay pixel-exact, as there.

    ``__call__(x, keys, epoch, covered=None)``: ``x`` float (B, C, S, S) in [0, 1]; ``covered`` (B, 1, S, S)
    moved with the geometry (nearest neighbour). Returns ``(x, covered)``."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def params(self, keys: list[str], epoch: int) -> torch.Tensor:
        """(B, N_DRAWS) float64 uniforms, one row per sample (the same on every device and batch)."""
        import numpy as np

        return torch.from_numpy(
            np.stack([np.random.default_rng(sample_seed(self.cfg.seed, epoch, k)).random(N_DRAWS) for k in keys])
        )

    def geometry(self, u: torch.Tensor, size: int) -> torch.Tensor:
        """(B, 2, 3) affine grids (output → input, normalised coordinates, ``affine_grid``'s convention):
        quarter turn plus, in ``tilt_share`` of the samples, a small angle with the largest fill-free
        centred crop resized back, then a horizontal and a vertical flip, each with probability 0.5."""
        cfg = self.cfg
        quarter = torch.floor(u[:, 0] * 4).clamp(max=3)
        tilt = u[:, 1] < cfg.tilt_share
        small = torch.where(tilt, (2 * u[:, 2] - 1) * cfg.rotation, torch.zeros_like(u[:, 2]))
        a = torch.deg2rad(small.abs())
        side = torch.floor(size / (torch.cos(a) + torch.sin(a))).clamp(min=1)
        zoom = torch.where(small != 0, side / size, torch.ones_like(side))
        ang = torch.deg2rad(90.0 * quarter + small)
        cos, sin = torch.cos(ang), torch.sin(ang)
        exact = small == 0  # a pure quarter turn: exact 0/±1 entries, so the resampling moves whole pixels
        cos = torch.where(exact, torch.round(cos), cos)
        sin = torch.where(exact, torch.round(sin), sin)
        fx = torch.where(u[:, 3] < 0.5, -1.0, 1.0)
        fy = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(len(u), 2, 3, dtype=torch.float64)
        # input = R(angle) · zoom · flips · output (F.rotate turns the picture counter-clockwise)
        theta[:, 0, 0] = cos * zoom * fx
        theta[:, 0, 1] = -sin * zoom * fy
        theta[:, 1, 0] = sin * zoom * fx
        theta[:, 1, 1] = cos * zoom * fy
        return theta

    def __call__(self, x: torch.Tensor, keys: list[str], epoch: int, covered: torch.Tensor | None = None):
        return self.apply(x, self.params(keys, epoch), covered)

    def apply(self, x: torch.Tensor, u: torch.Tensor, covered: torch.Tensor | None = None):
        """The recipe with given draws ``u`` (B, N_DRAWS) in [0, 1): 0 quarter turn, 1 tilt?, 2 angle,
        3 / 4 horizontal / vertical flip, 5 jitter?, 6 brightness, 7 contrast, 8 brightness first?, 9 blur?,
        10 sigma, 11 enhance?, 12 sharpen (else autocontrast)?, 13 sharpening amount."""
        b, c, h, w = x.shape
        dev = x.device
        theta = self.geometry(u, h).to(dev, torch.float32)
        grid = torch.nn.functional.affine_grid(theta, [b, c, h, w], align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if covered is not None:
            covered = torch.nn.functional.grid_sample(
                covered.float(), grid, mode="nearest", padding_mode="border", align_corners=False
            )
        # which steps any sample takes is read from the draws while they are on the CPU: no device sync
        any_blur, any_enhance = bool((u[:, 9] < BLUR_P).any()), bool((u[:, 11] < ENHANCE_P).any())
        u = u.to(dev, torch.float32)
        col = lambda t: t.view(b, 1, 1, 1)  # noqa: E731
        # colour jitter: brightness and contrast factors in [1 - JITTER, 1 + JITTER], in a random order
        jit = col(u[:, 5] < JITTER_P)
        bright, contrast = col(1 - JITTER + 2 * JITTER * u[:, 6]), col(1 - JITTER + 2 * JITTER * u[:, 7])

        def adjust_contrast(t):
            gray = F.rgb_to_grayscale(t) if c == 3 else t
            return (contrast * t + (1 - contrast) * gray.mean((1, 2, 3), keepdim=True)).clamp(0, 1)

        b_first = adjust_contrast((x * bright).clamp(0, 1))
        c_first = (adjust_contrast(x) * bright).clamp(0, 1)
        x = torch.where(jit, torch.where(col(u[:, 8] < 0.5), b_first, c_first), x)
        # Gaussian blur, sigma in BLUR_SIGMA
        if any_blur:
            lo_s, hi_s = BLUR_SIGMA
            x = torch.where(col(u[:, 9] < BLUR_P), _blur(x, _gauss_kernels(lo_s + (hi_s - lo_s) * u[:, 10])), x)
        # enhancement: sharpness (EdgeSharpen's, amount in SHARPEN_AMOUNT) or autocontrast, equally often
        if any_enhance:
            smooth = _blur(x, _gauss_kernels(torch.full((b,), SHARPEN_SIGMA, device=dev)))
            lo_a, hi_a = SHARPEN_AMOUNT
            sharp = (smooth - col(lo_a + (hi_a - lo_a) * u[:, 13]) * _edge_map(smooth)).clamp(0, 1)
            sharp_or_stretch = torch.where(col(u[:, 12] < 0.5), sharp, F.autocontrast(x))
            x = torch.where(col(u[:, 11] < ENHANCE_P), sharp_or_stretch, x)
        return x, covered
