"""The cell and nucleus segmenter: a U-Net whose maps are drawn into instances by a seeded watershed
and nucleus votes (:class:`UNetWatershed`), or torchvision's Mask R-CNN."""

import os

from torch import nn

from .artifact import read_artifact
from .classifier import channels_last
from .detector import CompactFPN, _anchor_generator
from .unet import UNetWatershed, unet_widths

SEGMENTER_BACKBONES = ("unet", "unet_wide", "compact_fpn", "resnet50_fpn")


# U-Net channels per level: unet for CPUs (32 channels at full resolution: the offsets at cell edges
# sharpen, README "Morphology and potency"; artifacts saved with 16 load with the widths of their
# weights, :func:`load_segmenter`); unet_wide measured better again (the four-map model at 16-32-64-128:
# cell / nucleus mask AP@0.5 0.370 / 0.691 against 0.324 / 0.655, same images and epochs) at 2.9 times
# the cost, for GPUs
UNET_WIDTHS = {"unet": (32, 32, 64, 128), "unet_wide": (32, 64, 128, 256)}


SEGMENTER_LEVELS = {"compact_fpn": 3, "resnet50_fpn": 5}  # Mask R-CNN pyramids (the U-Net has no anchors)


SEGMENTER_CLASSES = ("cell", "nucleus")  # labels 1 and 2; 0 is background


def build_segmenter(
    backbone_name: str = "unet",
    *,
    image_size: int = 256,
    score_thresh: float = 0.05,
    detections_per_img: int = 500,
    anchors: dict | None = None,
    min_area: int = 4,
    offsets: bool = True,
    vote_peak: float = 0.0,
    contact_score: bool = True,
    views: int = 1,
    widths: tuple[int, ...] | None = None,
) -> nn.Module:
    """A cell and nucleus instance segmenter. Input: list of float (3, H, W) in [0, 1]; output per
    image ``{"boxes", "labels" (1 cell, 2 nucleus), "scores", "masks" (k, 1, H, W)}``.
    ``unet``: :class:`UNetWatershed` (the default: measured better and four times cheaper than Mask
    R-CNN on CPUs, README); ``unet_wide``: the same with twice the channels (GPUs); ``compact_fpn``:
    Mask R-CNN (torchvision) on the compact CNN with a three-level pyramid (strides 4, 8, 16: nuclei
    are a few pixels wide); ``resnet50_fpn``: Mask R-CNN on torchvision's ResNet-50 FPN (GPUs).
    ``anchors`` (Mask R-CNN only) as for :func:`build_detector` (one size list per pyramid level).
    ``views`` (U-Nets only): test-time views their maps are averaged over (:meth:`UNetWatershed.maps`).
    ``widths`` (U-Nets only): channels per level instead of the backbone's (:data:`UNET_WIDTHS`; an
    artifact's, :func:`unet_widths`)."""
    if backbone_name not in SEGMENTER_BACKBONES:
        raise ValueError(f"unknown segmenter backbone {backbone_name!r}; valid: {', '.join(SEGMENTER_BACKBONES)}")
    if backbone_name in UNET_WIDTHS:
        unet = UNetWatershed(
            tuple(widths or UNET_WIDTHS[backbone_name]),
            score_thresh=score_thresh,
            detections_per_img=detections_per_img,
            min_area=min_area,
            offsets=offsets,
            vote_peak=vote_peak,
            contact_score=contact_score,
            views=views,
        )
        return channels_last(unet)
    return _mask_rcnn(backbone_name, image_size, score_thresh, detections_per_img, anchors)


def _mask_rcnn(backbone_name: str, image_size: int, score_thresh: float, detections_per_img: int, anchors):
    """torchvision's Mask R-CNN on the compact pyramid (CPU-sized heads) or on ResNet-50 FPN."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import MultiScaleRoIAlign

    levels = SEGMENTER_LEVELS[backbone_name]
    gen = _anchor_generator(backbone_name, levels, anchors, [8, 16, 32, 64, 128][:levels])
    heads: dict = {}
    if backbone_name == "compact_fpn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        body = CompactFPN(levels=levels)
        names = [str(i) for i in range(levels)]
        c = body.out_channels  # heads sized for CPUs: 256-wide box features, 64-channel mask convolutions
        heads = dict(
            box_head=TwoMLPHead(c * 7 * 7, 256),
            box_predictor=FastRCNNPredictor(256, len(SEGMENTER_CLASSES) + 1),
            mask_head=MaskRCNNHeads(c, (64, 64, 64, 64), 1),
            mask_predictor=MaskRCNNPredictor(64, 64, len(SEGMENTER_CLASSES) + 1),
        )
    else:
        body = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        names = ["0", "1", "2", "3"]
    return MaskRCNN(
        body,
        min_size=image_size,
        max_size=image_size * 2,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        rpn_anchor_generator=gen,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        box_score_thresh=score_thresh,
        box_detections_per_img=detections_per_img,
        # a dense culture holds a few hundred instances: 1,000 proposals per image cover them; 256 sampled
        # RoIs per image (torchvision's default 512) halve the RoIAlign backward pass, the costliest step on CPUs
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=1000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        box_batch_size_per_image=256,
        num_classes=None if heads else len(SEGMENTER_CLASSES) + 1,
        **heads,
    )


def load_segmenter(src: str | os.PathLike, endpoint_url: str | None = None) -> tuple[nn.Module, dict]:
    """A segmenter artifact → ``(model in eval mode, config)`` (its per-class score thresholds, chosen
    on the inner validation folds, are in the config and applied by the caller)."""
    config, state = read_artifact(src, endpoint_url)
    if config.get("kind") != "segmenter":
        raise ValueError(f"{src}: a {config.get('kind')} artifact, not a segmenter")
    # detections under every class's threshold are dropped by the caller anyway: not producing them
    # saves their masks (pasting hundreds of masks per image dominates inference on CPUs)
    thresholds = config.get("score_thresholds") or {}
    model = build_segmenter(
        config["architecture"],
        widths=unet_widths(state),  # an artifact keeps the widths it was trained with
        image_size=config["image_size"],
        score_thresh=min(thresholds.values()) if thresholds else 0.05,
        detections_per_img=int(config.get("detections_per_img", 500)),
        anchors=config.get("anchors"),
        min_area=int(config.get("min_area", 4)),
        offsets="head.weight" not in state or state["head.weight"].shape[0] == 6,  # U-Nets saved before offsets: 4
        vote_peak=float(config.get("vote_peak", 0.0)),  # artifacts saved before the vote centres: off
        contact_score=bool(config.get("contact_score", False)),  # their thresholds were chosen without it
        views=int(config.get("views", 1)),  # artifacts saved before the views (and Mask R-CNN's): one
    )
    model.load_state_dict(state)
    return model.eval(), config
