"""PaddleDetection RetinaNet weights (`.pdparams`: a pickled dict of numpy arrays).

The reference configuration (`configs/retinanet/_base_/retinanet_r50_fpn.yml`): ResNet
variant b (stride on the 3x3 conv, like torchvision) with frozen BN and stem + res2 frozen;
FPN with P6 from P5 and ReLU before P7; a 4-conv head without norm; anchors like ours
(size-major, offset 0: no permutation needed); SmoothL1 with beta 0 (L1); per-level top-1000
anchors by best class score, per-class top-1000 into NMS, keep 100, no clipping; RGB input
normalised with the ImageNet mean/std on [0, 1], short side 800 / long side 1333, stride 32.
"""

from __future__ import annotations

import re

from ..model.config import BackboneConfig, FPNConfig, HeadConfig, InferenceConfig, LossConfig, ModelConfig
from .coco_names import COCO_80_IDS, COCO_80_NAMES
from .common import ConversionError, RenameRule, anchors_per_location, fill_state_dict, rename_keys, resnet_depth
from .safe_pickle import to_tensors

_BN = {"weight": "weight", "bias": "bias", "_mean": "running_mean", "_variance": "running_var"}


def paddle_config(depth: int, num_classes: int, num_convs: int = 4) -> ModelConfig:
    return ModelConfig(
        num_classes=num_classes,
        class_names=COCO_80_NAMES if num_classes == 80 else [],
        category_ids=COCO_80_IDS if num_classes == 80 else [],
        backbone=BackboneConfig(depth=depth, norm="frozen_bn", freeze_at=2),
        fpn=FPNConfig(p6_source="p5"),
        head=HeadConfig(num_convs=num_convs, norm="none"),
        loss=LossConfig(box_loss="l1", normalization="batch"),
        inference=InferenceConfig(score_threshold=0.05, topk_candidates=1000, candidates="per_anchor",
                                  nms_pre_per_class=1000, nms_threshold=0.5, detections_per_image=100,
                                  clip_boxes="none"),
    )


def _block_index(name: str) -> int:
    """'res4a' -> 0, 'res3c' -> 2, 'res4b12' -> 12 (ResNet-101 numbering)."""
    letter, number = re.match(r"res\d([a-z])(\d*)$", name).groups()
    return int(number) if number else ord(letter) - ord("a")


def _backbone_block(m: re.Match) -> str:
    stage, block, branch, kind, param = m.groups()
    prefix = f"backbone.layer{int(stage) - 1}.{_block_index(block)}"
    if branch == "short":
        return f"{prefix}.downsample.{0 if kind == 'conv' else 1}.{param if kind == 'conv' else _BN[param]}"
    n = "abc".index(branch[-1]) + 1
    return f"{prefix}.conv{n}.{param}" if kind == "conv" else f"{prefix}.bn{n}.{_BN[param]}"


RULES: list[RenameRule] = [
    (r"backbone\.conv1\.conv1\.conv\.(\w+)", r"backbone.conv1.\1"),
    (r"backbone\.conv1\.conv1\.norm\.(\w+)", lambda m: f"backbone.bn1.{_BN[m[1]]}"),
    (r"backbone\.res([2-5])\.(res\d\w+)\.(branch2[abc]|short)\.(conv|norm)\.(\w+)", _backbone_block),
    (r"neck\.fpn_inner_res([345])_sum(?:_lateral)?\.(\w+)", lambda m: f"fpn.lateral_convs.{int(m[1]) - 3}.{m[2]}"),
    (r"neck\.fpn_res([345])_sum\.(\w+)", lambda m: f"fpn.output_convs.{int(m[1]) - 3}.{m[2]}"),
    (r"neck\.fpn_([67])\.(\w+)", r"fpn.p\1.\2"),
    (r"head\.conv_feat\.fcos_head_(cls|reg)_tower_conv_(\d+)\.conv\.(\w+)",
     lambda m: f"head.{'cls' if m[1] == 'cls' else 'bbox'}_subnet.{2 * int(m[2])}.{m[3]}"),
    (r"head\.retina_cls\.(\w+)", r"head.cls_score.\1"),
    (r"head\.retina_reg\.(\w+)", r"head.bbox_pred.\1"),
]


def convert_paddle(state: dict, num_classes: int | None = None):
    """`(ModelConfig, our state dict)` from PaddleDetection RetinaNet weights."""
    state = to_tensors(state)
    if "head.retina_cls.weight" not in state or "backbone.conv1.conv1.conv.weight" not in state:
        if any(k.startswith(("bbox_head.", "rpn_head.")) for k in state):
            raise ConversionError("this is a two-stage detector (Faster/Mask R-CNN), not a RetinaNet")
        raise ConversionError("not a PaddleDetection RetinaNet (no head.retina_cls / backbone.conv1 keys)")
    if "neck.fpn_6.weight" in state and state["neck.fpn_6.weight"].shape[1] != state["neck.fpn_res5_sum.weight"].shape[0]:
        raise ConversionError("FPN with P6 from C5 (use_c5: true) is not the reference layout; not supported")
    res4_blocks = len({k.split(".")[2] for k in state if k.startswith("backbone.res4.")})
    bottleneck = any(".branch2c." in k for k in state)
    depth = resnet_depth(res4_blocks, bottleneck)
    num_anchors = anchors_per_location(state["head.retina_reg.weight"])
    num_convs = len({k for k in state if re.match(r"head\.conv_feat\.fcos_head_cls_tower_conv_\d+\.conv\.weight$", k)})
    if any(".norm." in k for k in state if k.startswith("head.conv_feat.")):
        raise ConversionError("a RetinaFeat with normalisation layers is not the reference head; not supported")
    config = paddle_config(depth, state["head.retina_cls.weight"].shape[0] // num_anchors, num_convs)
    renamed = {new: state[key].float() if state[key].is_floating_point() else state[key]
               for key, new in rename_keys(state, RULES).items()}
    return fill_state_dict(config, renamed, num_classes, source="PaddleDetection")
