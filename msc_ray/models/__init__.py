"""The models: backbone registry and the study's classification head (:mod:`.classifier`), artifacts
(:mod:`.artifact`), the abnormal-cell detector (:mod:`.detector`) and the cell and nucleus segmenter
(:mod:`.segmenter`, its U-Net in :mod:`.unet`).
"""

from .artifact import ARTIFACT_FORMAT, load_classifier, read_artifact, read_config, save_artifact, state_digest
from .classifier import (
    BACKBONES,
    Backbone,
    CompactCNN,
    adapt_input_channels,
    backbone,
    build_classifier,
    channels_last,
    imagenet_sized,
    imagenet_weights_file,
    input_size,
    is_artifact,
    resolve_pretrained,
    study_head,
    supports_coverage,
)
from .detector import DETECTOR_BACKBONES, DETECTOR_LEVELS, CompactFPN, build_detector, load_detector
from .segmenter import (
    SEGMENTER_BACKBONES,
    SEGMENTER_CLASSES,
    SEGMENTER_LEVELS,
    UNET_WIDTHS,
    build_segmenter,
    load_segmenter,
)
from .unet import OFFSET_SCALE, OFFSET_WEIGHT, VOTE_PEAKS, UNetWatershed, _undo_view, instance_contacts, unet_widths

__all__ = [
    "ARTIFACT_FORMAT",
    "BACKBONES",
    "Backbone",
    "CompactCNN",
    "CompactFPN",
    "DETECTOR_BACKBONES",
    "DETECTOR_LEVELS",
    "OFFSET_SCALE",
    "OFFSET_WEIGHT",
    "SEGMENTER_BACKBONES",
    "SEGMENTER_CLASSES",
    "SEGMENTER_LEVELS",
    "UNET_WIDTHS",
    "UNetWatershed",
    "VOTE_PEAKS",
    "_undo_view",
    "adapt_input_channels",
    "backbone",
    "build_classifier",
    "build_detector",
    "build_segmenter",
    "channels_last",
    "imagenet_sized",
    "imagenet_weights_file",
    "is_artifact",
    "input_size",
    "instance_contacts",
    "load_classifier",
    "load_detector",
    "load_segmenter",
    "read_artifact",
    "read_config",
    "resolve_pretrained",
    "save_artifact",
    "state_digest",
    "study_head",
    "supports_coverage",
    "unet_widths",
]
