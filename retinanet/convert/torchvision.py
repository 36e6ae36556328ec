"""torchvision `retinanet_resnet50_fpn` (v1) and `retinanet_resnet50_fpn_v2` weights.

torchvision's behaviour is reproduced through the config: integer anchor sizes and rounded
templates, anchor strides from `image size // feature size`, P6 from P5 (v1) or C5 (v2),
GroupNorm head and GIoU loss (v2), per-image loss normalisation, 300 detections, and no
dropping of empty boxes. Its per-location anchors are ratio-major; ours are size-major, so
the predictors' output channels are permuted.
"""

from __future__ import annotations

import torch

from ..model.config import AnchorConfig, BackboneConfig, FPNConfig, HeadConfig, InferenceConfig, LossConfig, ModelConfig
from .coco_names import COCO_91_NAMES
from .common import ConversionError, RenameRule, fill_state_dict, permute_anchor_channels, rename_keys

TORCHVISION_ANCHOR_SIZES = [[x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))] for x in (32, 64, 128, 256, 512)]


def torchvision_config(version: int, num_classes: int = 91) -> ModelConfig:
    """The `ModelConfig` that behaves like torchvision's RetinaNet v1 or v2."""
    return ModelConfig(
        num_classes=num_classes,
        class_names=COCO_91_NAMES if num_classes == 91 else [],
        backbone=BackboneConfig(depth=50, norm="frozen_bn", freeze_at=2),
        fpn=FPNConfig(p6_source="p5" if version == 1 else "c5"),
        head=HeadConfig(norm="none" if version == 1 else "gn"),
        anchors=AnchorConfig(sizes=[[float(s) for s in level] for level in TORCHVISION_ANCHOR_SIZES],
                             round_cell_anchors=True, stride_from_image_size=True),
        loss=LossConfig(box_loss="l1" if version == 1 else "giou", normalization="per_image"),
        inference=InferenceConfig(detections_per_image=300, min_box_size=-1.0),
    )


def detect_version(state: dict[str, torch.Tensor]) -> int:
    if "backbone.fpn.extra_blocks.p6.weight" not in state or "head.classification_head.cls_logits.weight" not in state:
        raise ConversionError("not a torchvision RetinaNet state dict (no FPN P6 / classification head keys)")
    p6_in = state["backbone.fpn.extra_blocks.p6.weight"].shape[1]
    return 1 if p6_in == state["backbone.fpn.layer_blocks.0.0.weight"].shape[0] else 2


def convert_torchvision(state: dict[str, torch.Tensor], num_classes: int | None = None):
    """Returns `(ModelConfig, our state dict)` for a torchvision RetinaNet state dict."""
    version = detect_version(state)
    num_anchors = 9
    source_classes = state["head.classification_head.cls_logits.weight"].shape[0] // num_anchors
    config = torchvision_config(version, source_classes)
    norm = version == 2
    step = 3 if norm else 2  # position of conv j inside our subnet Sequential

    rules: list[RenameRule] = [
        (r".*num_batches_tracked", None),
        (r"backbone\.body\.(.+)", r"backbone.\1"),
        (r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(\w+)", r"fpn.lateral_convs.\1.\2"),
        (r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(\w+)", r"fpn.output_convs.\1.\2"),
        (r"backbone\.fpn\.extra_blocks\.(.+)", r"fpn.\1"),
        (r"head\.classification_head\.cls_logits\.(\w+)", r"head.cls_score.\1"),
        (r"head\.regression_head\.bbox_reg\.(\w+)", r"head.bbox_pred.\1"),
        (r"head\.(classification|regression)_head\.conv\.(\d+)\.(\d)\.(weight|bias)",
         lambda m: f"head.{'cls' if m[1] == 'classification' else 'bbox'}_subnet."
                   f"{int(m[2]) * step + int(m[3])}.{m[4]}"),
    ]
    perm = _ratio_major_to_size_major(len(config.anchors.sizes[0]), len(config.anchors.aspect_ratios))
    renamed = {}
    for key, new in rename_keys(state, rules).items():
        value = state[key]
        if new.startswith("head.cls_score."):
            value = permute_anchor_channels(value, perm, source_classes)
        elif new.startswith("head.bbox_pred."):
            value = permute_anchor_channels(value, perm, 4)
        renamed[new] = value
    return fill_state_dict(config, renamed, num_classes, source="torchvision")


def _ratio_major_to_size_major(num_sizes: int, num_ratios: int) -> list[int]:
    """For each of our anchors (size s, ratio r at s*R + r), torchvision's index r*S + s."""
    return [r * num_sizes + s for s in range(num_sizes) for r in range(num_ratios)]
