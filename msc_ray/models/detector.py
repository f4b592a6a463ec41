"""The abnormal-cell detector: torchvision's RetinaNet on the compact FPN or a ResNet FPN, anchors from
the training boxes."""

import os

import torch
from torch import nn

from .artifact import read_artifact
from .classifier import CompactCNN, channels_last

DETECTOR_BACKBONES = ("compact_fpn", "resnet18_fpn", "resnet50_fpn")


DETECTOR_LEVELS = {"compact_fpn": 2, "resnet18_fpn": 5, "resnet50_fpn": 5}


class CompactFPN(nn.Module):
    """A small detection backbone: :class:`CompactCNN`'s blocks (per-image standardisation first),
    with a feature pyramid over its last ``levels`` blocks (``out_channels`` each): strides 8 and 16
    for 2 levels, 4, 8 and 16 for 3 (small objects such as nuclei). Input (N, 3, H, W); output
    ``{"0": finest, …}``."""

    def __init__(self, out_channels: int = 64, widths: tuple[int, ...] = (32, 64, 128, 192), levels: int = 2):
        from torchvision.ops import FeaturePyramidNetwork

        super().__init__()
        self.body = CompactCNN(widths=widths).features
        self.out_channels = out_channels
        self.first = len(widths) - levels + 1  # the first block (1-based) whose output is a level
        self.fpn = FeaturePyramidNetwork(list(widths[-levels:]), out_channels)

    def forward(self, x: torch.Tensor):
        from collections import OrderedDict

        feats = OrderedDict()
        blocks = 0
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                blocks += 1
                if blocks >= self.first:
                    feats[str(blocks - self.first)] = x
        return self.fpn(feats)


def _anchor_generator(backbone_name: str, levels: int, anchors: dict | None, base: list[int]):
    """torchvision's AnchorGenerator for ``anchors`` (``{"sizes": [[px, ...] per level],
    "aspect_ratios": [h/w, ...]}``, see :func:`msc_ray.engine.anchor_plan`); default: three sizes an
    octave apart per level from ``base``, ratios 0.5, 1 and 2."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if anchors is None:
        anchors = {"sizes": [[s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)] for s in base], "aspect_ratios": [0.5, 1.0, 2.0]}
    if len(anchors["sizes"]) != levels:
        raise ValueError(f"{backbone_name} has {levels} pyramid levels, anchors give {len(anchors['sizes'])}")
    return AnchorGenerator(
        tuple(tuple(float(s) for s in lv) for lv in anchors["sizes"]),
        tuple(tuple(float(r) for r in anchors["aspect_ratios"]) for _ in range(levels)),
    )


def build_detector(
    backbone_name: str = "compact_fpn",
    *,
    num_classes: int = 2,
    image_size: int = 512,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    anchors: dict | None = None,
) -> nn.Module:
    """RetinaNet for abnormal cells. Input: list of float (3, H, W) in [0, 1]; output per image
    ``{"boxes": (k, 4) [x1, y1, x2, y2] pixels, "scores": (k,), "labels": (k,)}`` with label 1 =
    abnormal (0 is background). ``compact_fpn`` is a small CNN with a two-level pyramid (CPUs, 64–256
    px); ``resnet18_fpn`` / ``resnet50_fpn`` are ResNet FPNs with five levels (GPUs, 300–800 px).
    ``anchors``: ``{"sizes": [[px, ...] per level], "aspect_ratios": [h/w, ...]}`` (see
    :func:`msc_ray.engine.anchor_plan`); default torchvision's. Images are resized so their short side
    is ``image_size`` (the transform inside RetinaNet), boxes are returned in the input's pixels."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    if backbone_name not in DETECTOR_BACKBONES:
        raise ValueError(f"unknown detector backbone {backbone_name!r}; valid: {', '.join(DETECTOR_BACKBONES)}")
    levels = DETECTOR_LEVELS[backbone_name]
    gen = _anchor_generator(backbone_name, levels, anchors, [32, 64, 128, 256, 512][-levels:])
    common = dict(
        min_size=image_size,
        max_size=image_size * 2,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        anchor_generator=gen,
    )
    if backbone_name == "compact_fpn":
        return channels_last(RetinaNet(CompactFPN(), num_classes=num_classes, **common))
    fpn = resnet_fpn_backbone(
        backbone_name=backbone_name.removesuffix("_fpn"),
        weights=None,
        norm_layer=nn.BatchNorm2d,
        trainable_layers=5,
        returned_layers=[2, 3, 4],
        extra_blocks=LastLevelP6P7(256, 256),
    )
    return channels_last(RetinaNet(fpn, num_classes=num_classes, **common))


def load_detector(src: str | os.PathLike, endpoint_url: str | None = None) -> tuple[nn.Module, dict]:
    """A detector artifact → ``(model in eval mode, config)``; its score threshold and NMS IoU
    (chosen on the validation folds) are set on the model."""
    config, state = read_artifact(src, endpoint_url)
    if config.get("kind") != "detector":
        raise ValueError(f"{src}: a {config.get('kind')} artifact, not a detector")
    model = build_detector(
        config["architecture"],
        num_classes=len(config["classes"]) + 1,
        image_size=config["image_size"],
        score_thresh=config["score_threshold"],
        nms_thresh=config["nms_iou"],
        anchors=config.get("anchors"),
    )
    model.load_state_dict(state)
    return model.eval(), config
