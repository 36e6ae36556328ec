"""detectron2 RetinaNet weights (model-zoo `.pkl` or a `.pth` with the same keys).

detectron2's semantics, reproduced through the config: an MSRA ResNet (stride on the first
1x1 conv of a bottleneck), BGR input in [0, 255] with the pixel mean subtracted and std 1,
P6 from C5, anchors with offset 0 in size-major order (the same as ours, so no channel
permutation), smooth-L1 with beta 0.1, and the loss normaliser as a moving average.
"""

from __future__ import annotations

import re


from ..model.config import AnchorConfig, BackboneConfig, FPNConfig, HeadConfig, InputConfig, LossConfig, ModelConfig
from .coco_names import COCO_80_IDS, COCO_80_NAMES
from .common import ConversionError, anchors_per_location, fill_state_dict, resnet_depth
from .safe_pickle import to_tensors

_STAGE = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


def detectron2_config(depth: int, num_classes: int, p6_source: str, pixel_mean=None, pixel_std=None) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes,
        class_names=COCO_80_NAMES if num_classes == 80 else [],
        category_ids=COCO_80_IDS if num_classes == 80 else [],
        backbone=BackboneConfig(depth=depth, norm="frozen_bn", freeze_at=2, stride_in_1x1=depth >= 50),
        fpn=FPNConfig(p6_source=p6_source),
        head=HeadConfig(norm="none"),
        anchors=AnchorConfig(offset=0.0),
        loss=LossConfig(box_loss="smooth_l1", smooth_l1_beta=0.1, normalization="ema"),
        input=InputConfig(train_min_sizes=[640, 672, 704, 736, 768, 800], test_min_size=800, max_size=1333,
                          pixel_mean=list(pixel_mean or [103.53, 116.28, 123.675]),
                          pixel_std=list(pixel_std or [1.0, 1.0, 1.0]), pixel_scale=255.0, channel_order="BGR"),
    )


def rename_key(key: str) -> str | None:
    """detectron2 name -> ours (None: not a weight we keep)."""
    if key in ("pixel_mean", "pixel_std") or key.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^backbone\.bottom_up\.stem\.conv1\.(norm\.)?(\w+)$", key)
    if m:
        return f"backbone.{'bn1' if m.group(1) else 'conv1'}.{m.group(2)}"
    m = re.match(r"^backbone\.bottom_up\.(res[2-5])\.(\d+)\.(conv\d|shortcut)\.(norm\.)?(\w+)$", key)
    if m:
        stage, block, layer, norm, param = m.groups()
        if layer == "shortcut":
            name = "downsample.1" if norm else "downsample.0"
        else:
            name = f"bn{layer[-1]}" if norm else layer
        return f"backbone.{_STAGE[stage]}.{block}.{name}.{param}"
    m = re.match(r"^backbone\.fpn_(lateral|output)([345])\.(\w+)$", key)
    if m:
        kind = "lateral_convs" if m.group(1) == "lateral" else "output_convs"
        return f"fpn.{kind}.{int(m.group(2)) - 3}.{m.group(3)}"
    m = re.match(r"^backbone\.top_block\.(p6|p7)\.(\w+)$", key)
    if m:
        return f"fpn.{m.group(1)}.{m.group(2)}"
    return key  # the head's names are ours already; unknown keys are reported as unused


def convert_detectron2(state: dict, num_classes: int | None = None):
    """`(ModelConfig, our state dict)` from detectron2's RetinaNet weights."""
    state = to_tensors(state)
    if "head.cls_score.weight" not in state or "backbone.bottom_up.stem.conv1.weight" not in state:
        if any(k.startswith(("roi_heads.", "proposal_generator.")) for k in state):
            raise ConversionError("this is a two-stage detector (Faster/Mask R-CNN), not a RetinaNet")
        raise ConversionError("not a detectron2 RetinaNet (no head.cls_score / backbone.bottom_up keys)")
    res4_blocks = len({k.split(".")[3] for k in state if k.startswith("backbone.bottom_up.res4.")})
    bottleneck = any(".conv3." in k for k in state)
    depth = resnet_depth(res4_blocks, bottleneck)
    num_anchors = anchors_per_location(state["head.bbox_pred.weight"])
    source_classes = state["head.cls_score.weight"].shape[0] // num_anchors
    p6_in = state["backbone.top_block.p6.weight"].shape[1]
    p6_source = "p5" if p6_in == state["backbone.fpn_output5.weight"].shape[0] else "c5"
    mean = state["pixel_mean"].flatten().tolist() if "pixel_mean" in state else None
    std = state["pixel_std"].flatten().tolist() if "pixel_std" in state else None
    config = detectron2_config(depth, source_classes, p6_source, mean, std)
    renamed = {}
    for key, value in state.items():
        new = rename_key(key)
        if new is not None:
            renamed[new] = value.float() if value.is_floating_point() else value
    return fill_state_dict(config, renamed, num_classes, source="detectron2")
