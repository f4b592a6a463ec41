"""Backbone registry and the study's classification head.

Every backbone is a torchvision model built with ``get_model``; the registry says where its final
linear layer sits, and that layer is replaced by the study's head: feature vector → 1024 → classes,
with ReLU and dropout. Adding a backbone is one line in :data:`BACKBONES`.

Grayscale meets 3-channel backbones in the data pipeline (the gray plane is repeated; ImageNet
normalisation applies). With ``in_channels != 3`` the first convolution is rebuilt for that many
channels instead (pretrained filters are averaged over RGB and spread over the new channels).
ViT has a fixed input size: without pretrained weights it is built for the pipeline's input size
rounded up to a multiple of its 16-px patch; with ImageNet weights the pipeline resizes to 224.

ImageNet weights are never downloaded: ``pretrained="auto"`` uses the file in torch's hub cache
(``$TORCH_HOME/hub/checkpoints``) when it is there, ``"none"`` starts from random weights, and a path
loads that state dict. Files load with ``torch.load(weights_only=True)``.
"""

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .unet import _double_conv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    name: str  # torchvision model name for get_model
    head: str  # dotted path of the final nn.Linear, replaced by the study's head
    min_size: int = 32  # smallest input side the architecture accepts
    patch: int = 1  # input side must be a multiple of this (ViT)
    pretrained_size: int | None = None  # input side the ImageNet weights require
    kwargs: dict = field(default_factory=dict)
    builder: Callable[..., nn.Module] | None = None  # None: torchvision's get_model(name)


class CompactCNN(nn.Module):
    """A small 4-block CNN baseline: (N, 3, S, S) → (N, num_classes). Each block is two 3×3
    convolutions with BatchNorm and ReLU and a 2× max-pool (widths 16, 32, 64, 128), then global
    average pooling — coverage-like properties such as confluence are averages over the image.
    The input is standardised per image and channel first (instance normalisation).
    Fast on CPUs at 64–128 px; ``fc`` is replaced by the study's head like a torchvision model's.

    ``coverage``: a 1×1 convolution on the last feature map, a logit per position of the share of it
    that cells cover — trained from cell masks where a corpus has them (coverage supervision:
    :class:`msc_ray.engine.ClassifierLoss`); ``forward`` never uses it, so an exported model leaves
    it out."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (16, 32, 64, 128), coverage: bool = False):
        super().__init__()
        # per-image standardisation first: brightness, contrast and min–max stretch (illumination, and
        # the study's photometric augmentations) leave the features unchanged, so BatchNorm statistics
        # gathered on augmented images hold for plain ones
        layers, c_in = [nn.InstanceNorm2d(3, affine=False)], 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.coverage = nn.Conv2d(c_in, 1, 1) if coverage else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))

    def forward_with_coverage(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs (N, K), coverage logits (N, 1, S/16, S/16))`` from one pass of the features."""
        if self.coverage is None:
            raise RuntimeError("this CompactCNN was built without a coverage head")
        f = self.features(x)
        return self.fc(torch.flatten(self.pool(f), 1)), self.coverage(f)


class CoverageUNet(nn.Module):
    """Confluence measured, not guessed: a small U-Net (the compact CNN's four blocks as its encoder, one
    convolution per decoder level, ``decoder`` widths going up from the deepest level: two levels by
    default, so the map has half the input's side) whose output is a map of logits of the share of each
    of its positions that cells cover. Confluence is the map's mean probability — the covered fraction,
    as an instrument's confluence mask measures it — and the bands follow from it through an ordinal
    (cumulative-link) head: ``P(band ≥ j) = σ((c − θ_j) / s)``, thresholds ``θ`` learnt in order (started
    at :data:`msc_ray.BAND_EDGES` for four bands, evenly otherwise) and one learnt width ``s``.

    ``forward``: (N, 3, S, S) → (N, num_classes + extra_outputs): the bands' log-probabilities (logits
    for softmax, temperature scaling and cross-entropy alike) and, with ``extra_outputs``, the logit of
    ``c`` (the confluence output). ``coverage`` is the map's last 1×1 convolution; with cell masks it
    trains against the covered share of each position (coverage supervision, :meth:`forward_with_coverage`),
    and it is part of the exported model. Without masks the map learns from the bands and the measured
    confluence alone. On development corpora (single-stack, 64 px) a map at the full input side read
    confluence no better than at half of it and cost 1.6 times the training time (docs/measurements.md)."""

    def __init__(
        self,
        num_classes: int = 4,
        extra_outputs: int = 0,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        decoder: tuple[int, ...] = (32, 16),
        coverage: bool = True,  # the map is the model: accepted for the registry's keyword, always built
    ):
        super().__init__()
        from .. import BAND_EDGES

        self.norm = nn.InstanceNorm2d(3, affine=False)
        self.down = nn.ModuleList(_double_conv(3 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths))
        # one convolution per level up from the deepest; fewer levels than the encoder has: a coarser map
        ups, c = [], widths[-1]
        for level, w in zip(range(len(widths) - 2, -1, -1), decoder, strict=False):
            conv = nn.Conv2d(c + widths[level], w, 3, padding=1, bias=False)
            ups.append(nn.Sequential(conv, nn.BatchNorm2d(w), nn.ReLU(inplace=True)))
            c = w
        self.up = nn.ModuleList(ups)
        self.coverage = nn.Conv2d(c, 1, 1)
        edges = (
            BAND_EDGES[1:-1] if num_classes == len(BAND_EDGES) - 1 else [j / num_classes for j in range(1, num_classes)]
        )
        gaps = torch.diff(torch.tensor(edges, dtype=torch.float32))
        self.theta0 = nn.Parameter(torch.tensor([float(edges[0])]))
        self.gaps = nn.Parameter(torch.log(torch.expm1(gaps)))  # softplus⁻¹: the thresholds stay in order
        self.log_width = nn.Parameter(torch.tensor([math.log(0.02)]))
        self.num_classes, self.extra_outputs = num_classes, extra_outputs

    def coverage_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) → (N, 1, S / 2^k, S / 2^k) logits of the covered share, k encoder levels the decoder
        does not climb back (one by default)."""
        x = self.norm(x)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=False):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = block(torch.cat([x, skip], 1))
        return self.coverage(x)

    def thresholds(self) -> torch.Tensor:
        """The band thresholds θ (K − 1,), in order: the first, then softplus-positive gaps."""
        return torch.cat([self.theta0, self.theta0 + torch.cumsum(nn.functional.softplus(self.gaps), 0)])

    def head(self, cov: torch.Tensor) -> torch.Tensor:
        """Coverage logits (N, 1, h, w) → outputs (N, num_classes + extra_outputs), in float32."""
        c = torch.sigmoid(cov.float()).mean((1, 2, 3))
        above = torch.sigmoid((c[:, None] - self.thresholds()[None]) / self.log_width.exp())  # P(band ≥ j), j = 1 … K−1
        ones, zeros = torch.ones_like(c[:, None]), torch.zeros_like(c[:, None])
        cum = torch.cat([ones, above, zeros], 1)
        out = [torch.log((cum[:, :-1] - cum[:, 1:]).clamp(min=1e-6))]
        if self.extra_outputs:
            out.append(torch.logit(c, eps=1e-4)[:, None])
        return torch.cat(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.coverage_logits(x))

    def forward_with_coverage(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(outputs, coverage logits (N, 1, h, w))`` from one pass."""
        cov = self.coverage_logits(x)
        return self.head(cov), cov


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("compact_cnn", "fc", min_size=16, builder=CompactCNN),
        Backbone("coverage_unet", "", min_size=16, builder=CoverageUNet),
        Backbone("alexnet", "classifier.6", min_size=63),
        Backbone("inception_v3", "fc", min_size=75, kwargs={"aux_logits": False, "init_weights": True}),
        Backbone("resnet18", "fc"),
        Backbone("resnet50", "fc"),
        Backbone("densenet121", "classifier"),
        Backbone("vgg19", "classifier.6"),
        Backbone("shufflenet_v2_x2_0", "fc"),
        Backbone("mobilenet_v3_large", "classifier.3"),
        Backbone("mobilenet_v3_small", "classifier.3"),
        Backbone("vit_b_16", "heads.head", patch=16, pretrained_size=224),
    )
}


def channels_last(model: nn.Module) -> nn.Module:
    """The model's 4-D weights in channels-last (NHWC) memory, in place: the same model numerically, its
    state dict loads into either layout, ``.to(device)`` keeps it. oneDNN's CPU convolutions and GPU tensor
    cores are faster on it (measured speed-ups, and why Mask R-CNN stays NCHW: README, "Memory layout").
    The classifier, detector and U-Net builders return their models in this layout."""
    return model.to(memory_format=torch.channels_last)


def backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


def input_size(name: str, requested: int, pretrained: bool = False) -> int:
    """The input side a backbone gets for a requested side."""
    b = backbone(name)
    if pretrained and b.pretrained_size:
        return b.pretrained_size
    size = max(requested, b.min_size)
    return -(-size // b.patch) * b.patch


def study_head(in_features: int, num_classes: int, dropout: float = 0.5) -> nn.Sequential:
    """feature vector (N, in_features) → (N, num_classes) logits."""
    return nn.Sequential(
        nn.Linear(in_features, 1024), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(1024, num_classes)
    )


def _get_parent(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parts = dotted.split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    return parent, parts[-1]


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    if name.isdigit():
        parent[int(name)] = module
    else:
        setattr(parent, name, module)


def _get(parent: nn.Module, name: str) -> nn.Module:
    return parent[int(name)] if name.isdigit() else getattr(parent, name)


def adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first convolution for ``in_channels`` inputs, keeping what its filters learnt."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            if mod.in_channels == in_channels:
                return
            new = nn.Conv2d(
                in_channels,
                mod.out_channels,
                mod.kernel_size,
                mod.stride,
                mod.padding,
                mod.dilation,
                mod.groups,
                mod.bias is not None,
                mod.padding_mode,
            )
            with torch.no_grad():
                mean = mod.weight.mean(dim=1, keepdim=True)
                new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (mod.in_channels / in_channels))
                if mod.bias is not None:
                    new.bias.copy_(mod.bias)
            parent, last = _get_parent(model, name)
            _set(parent, last, new)
            return
    raise ValueError("model has no Conv2d to adapt")


def imagenet_weights_file(name: str) -> Path | None:
    """The hub-cache path of a backbone's default ImageNet weights, when that file is present."""
    from torchvision.models import get_model_weights

    if backbone(name).builder is not None:
        return None
    try:
        url = get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError):
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return path if path.is_file() else None


def is_artifact(src: str | os.PathLike) -> bool:
    """Whether a ``--pretrained`` value names a model artifact (a folder with ``config.json``, or an
    ``s3://`` URI) rather than a state-dict file."""
    return str(src).startswith("s3://") or Path(src).is_dir()


def resolve_pretrained(name: str, pretrained: str) -> Path | str | None:
    """``"none"`` → None; ``"auto"`` → the cached ImageNet file or None; a file → that state dict; a
    folder or ``s3://`` URI → a classifier artifact whose backbone weights start the model (another
    stack's or corpus's model: transfer; see :func:`build_classifier`)."""
    if pretrained in ("none", "", None):
        return None
    if pretrained == "auto":
        found = imagenet_weights_file(name)
        if found is None:
            log.info("no cached ImageNet weights for %s: starting from random weights", name)
        return found
    if str(pretrained).startswith("s3://"):
        return str(pretrained)
    path = Path(pretrained)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--pretrained {pretrained}: a folder, but not a model artifact (no config.json)")
        return path
    if not path.is_file():
        raise ValueError(f"--pretrained {pretrained}: no such weights file or artifact")
    return path


def imagenet_sized(weights: Path | str | None) -> bool:
    """Whether the input side follows the weights' ImageNet size (:func:`input_size`): a state-dict
    file yes, an artifact no (its model was trained at the side the job asks for, or loading says not)."""
    return weights is not None and not is_artifact(weights)


def supports_coverage(name: str) -> bool:
    """Whether the backbone trains a coverage map from cell masks (the compact CNN beside its heads, the
    coverage U-Net as its output)."""
    b = backbone(name)
    return b.builder is CompactCNN or not b.head


def build_classifier(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    image_size: int = 224,
    dropout: float = 0.5,
    weights_file: str | os.PathLike | None = None,
    extra_outputs: int = 0,
    coverage_head: bool = False,
    weights_endpoint_url: str | None = None,
) -> nn.Module:
    """A registry backbone with the study's head: (N, in_channels, S, S) → (N, num_classes +
    extra_outputs); the first ``num_classes`` are logits, an extra one is the confluence output
    (a logit of the covered fraction). ``coverage_head``: the compact CNN's coverage map for training
    (:meth:`CompactCNN.forward_with_coverage`); see :func:`supports_coverage`. ``weights_file``: a state
    dict of the bare backbone (ImageNet's), loaded before the head is replaced, or a classifier artifact
    (:func:`resolve_pretrained`; ``weights_endpoint_url`` for one in object storage), whose weights but
    its head's start the finished model."""
    from torchvision.models import get_model

    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
    b = backbone(name)
    kwargs = dict(b.kwargs)
    if b.patch > 1:
        kwargs["image_size"] = image_size
    if coverage_head:
        if not supports_coverage(name):
            able = ", ".join(n for n in BACKBONES if supports_coverage(n))
            raise ValueError(f"{name}: no coverage head (only {able})")
        kwargs["coverage"] = True
    if not b.head:  # a model with its own outputs (the coverage U-Net): no study head to put on
        kwargs.update(num_classes=num_classes, extra_outputs=extra_outputs)
    model = b.builder(**kwargs) if b.builder else get_model(name, weights=None, **kwargs)
    artifact = weights_file is not None and is_artifact(weights_file)
    if weights_file is not None and not artifact:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("AuxLogits")]:
            raise ValueError(
                f"{weights_file}: does not match {name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    if b.head:
        parent, last = _get_parent(model, b.head)
        old = _get(parent, last)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name}: {b.head} is {type(old).__name__}, expected Linear")
        _set(parent, last, study_head(old.in_features, num_classes + extra_outputs, dropout))
    if in_channels != 3:
        adapt_input_channels(model, in_channels)
    if artifact:
        _load_backbone_of(model, name, weights_file, weights_endpoint_url)
    return channels_last(model)


def _load_backbone_of(model: nn.Module, name: str, src: Path | str, endpoint_url: str | None) -> None:
    """Start ``model`` from a classifier artifact of the same backbone: every weight but the study head's
    (and the coverage map's, which artifacts leave out), which start fresh for the new task."""
    from .artifact import read_artifact

    config, state = read_artifact(src, endpoint_url)
    if config.get("kind") != "classifier" or config.get("architecture") != name:
        what = config.get("architecture") if config.get("kind") == "classifier" else f"a {config.get('kind')}"
        raise ValueError(f"--pretrained {src}: a {what} model, not {name}")
    head = backbone(name).head
    state = {k: v for k, v in state.items() if not (head and k.startswith(head + "."))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape (input channels, a ViT's input side)
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise ValueError(f"--pretrained {src}: its weights do not fit {name} here ({detail})") from None
    missing = [k for k in missing if not (head and k.startswith((head + ".", "coverage.")))]
    if missing or unexpected:
        raise ValueError(
            f"--pretrained {src}: does not match {name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
