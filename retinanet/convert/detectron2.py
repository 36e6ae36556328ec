"""detectron2 RetinaNet weights (model-zoo `.pkl` or a `.pth` with the same keys).

detectron2's behaviour is reproduced through the config. Where each setting comes from
(detectron2's `config/defaults.py`, overridden by `configs/Base-RetinaNet.yaml`, which every
`retinanet_R_*_FPN_*` model-zoo config inherits):
- backbone: `RESNETS.STRIDE_IN_1X1: True` (MSRA ResNet: stride on the first 1x1 conv),
  `FREEZE_AT: 2`, FrozenBN; depth read from the weights.
- input: `PIXEL_MEAN [103.53, 116.28, 123.675]`, `PIXEL_STD [1, 1, 1]` on BGR in [0, 255]
  (the file's own `pixel_mean`/`pixel_std` when stored), `MIN_SIZE_TRAIN (640..800)`,
  `MIN_SIZE_TEST 800`, `MAX_SIZE 1333`, size divisibility 32 (FPN).
- FPN: P6 from C5 (`LastLevelP6P7` on `res5`); read from the weights' P6 input channels.
- anchors: Base-RetinaNet's sizes `x * 2^(i/3)` for x in 32..512, ratios 0.5/1/2,
  `ANCHOR_GENERATOR.OFFSET: 0.0`, size-major order (as ours: no channel permutation).
- matching: `RETINANET.IOU_THRESHOLDS [0.4, 0.5]`, `IOU_LABELS [0, -1, 1]`, low-quality
  matches allowed; `BBOX_REG_WEIGHTS (1, 1, 1, 1)`, scale clamp log(1000/16).
- loss: `FOCAL_LOSS_ALPHA 0.25`, `GAMMA 2.0`; `BBOX_REG_LOSS_TYPE smooth_l1` with
  `SMOOTH_L1_LOSS_BETA: 0.0` from Base-RetinaNet.yaml (defaults.py says 0.1, which the
  published configs override): an L1 loss; normaliser: a moving average of the foreground
  count (momentum 0.9, initial 100, `loss_normalizer` in `retinanet.py`).
- inference: `SCORE_THRESH_TEST 0.05`, `TOPK_CANDIDATES_TEST 1000`, `NMS_THRESH_TEST 0.5`,
  `TEST.DETECTIONS_PER_IMAGE 100`; NMS on unclipped boxes, then clipping to the original
  image and dropping empty boxes (`detector_postprocess`).
"""

from __future__ import annotations

from ..model.config import (AnchorConfig, BackboneConfig, FPNConfig, HeadConfig, InferenceConfig, InputConfig,
                            LossConfig, ModelConfig)
from .coco_names import COCO_80_IDS, COCO_80_NAMES
from .common import ConversionError, RenameRule, anchors_per_location, fill_state_dict, rename_keys, resnet_depth
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
        loss=LossConfig(box_loss="smooth_l1", smooth_l1_beta=0.0, normalization="ema", ema_momentum=0.9,
                        ema_initial=100.0),
        inference=InferenceConfig(score_threshold=0.05, topk_candidates=1000, nms_threshold=0.5,
                                  detections_per_image=100, clip_boxes="after_nms"),
        input=InputConfig(train_min_sizes=[640, 672, 704, 736, 768, 800], test_min_size=800, max_size=1333,
                          pixel_mean=list(pixel_mean or [103.53, 116.28, 123.675]),
                          pixel_std=list(pixel_std or [1.0, 1.0, 1.0]), pixel_scale=255.0, channel_order="BGR"),
    )


RULES: list[RenameRule] = [
    (r"pixel_(mean|std)|.*num_batches_tracked", None),
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.bn1.\1"),
    (r"backbone\.bottom_up\.stem\.conv1\.(\w+)", r"backbone.conv1.\1"),
    (r"backbone\.bottom_up\.(res[2-5])\.(\d+)\.shortcut\.norm\.(\w+)",
     lambda m: f"backbone.{_STAGE[m[1]]}.{m[2]}.downsample.1.{m[3]}"),
    (r"backbone\.bottom_up\.(res[2-5])\.(\d+)\.shortcut\.(\w+)",
     lambda m: f"backbone.{_STAGE[m[1]]}.{m[2]}.downsample.0.{m[3]}"),
    (r"backbone\.bottom_up\.(res[2-5])\.(\d+)\.conv(\d)\.norm\.(\w+)",
     lambda m: f"backbone.{_STAGE[m[1]]}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.(res[2-5])\.(\d+)\.conv(\d)\.(\w+)",
     lambda m: f"backbone.{_STAGE[m[1]]}.{m[2]}.conv{m[3]}.{m[4]}"),
    (r"backbone\.fpn_lateral([345])\.(\w+)", lambda m: f"fpn.lateral_convs.{int(m[1]) - 3}.{m[2]}"),
    (r"backbone\.fpn_output([345])\.(\w+)", lambda m: f"fpn.output_convs.{int(m[1]) - 3}.{m[2]}"),
    (r"backbone\.top_block\.(p6|p7)\.(\w+)", r"fpn.\1.\2"),
    # the head's names (head.cls_subnet.*, head.cls_score.*, ...) are ours already
]


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
    renamed = {new: state[key].float() if state[key].is_floating_point() else state[key]
               for key, new in rename_keys(state, RULES).items()}
    return fill_state_dict(config, renamed, num_classes, source="detectron2")
