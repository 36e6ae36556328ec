"""Building a `RetinaNet` and its parts from a `ModelConfig`: the only place that reads the
config. The parts' builders serve the diagnostics too (`analysis`), so that they see the
anchors, resizing and matching the model uses."""

from __future__ import annotations

from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .box_coding import BoxCoder
from .config import AnchorConfig, InputConfig, MatcherConfig, ModelConfig
from .detector import RetinaNet
from .fpn import FPN
from .head import RetinaNetHead
from .losses import RetinaNetLoss
from .matching import AnchorMatcher
from .postprocess import PostProcessor
from .preprocess import Preprocessor


def build_anchor_generator(a: AnchorConfig) -> AnchorGenerator:
    return AnchorGenerator(a.sizes, a.aspect_ratios, a.strides, offset=a.offset, round_to_int=a.round_cell_anchors,
                           stride_from_image_size=a.stride_from_image_size)


def build_preprocessor(i: InputConfig) -> Preprocessor:
    return Preprocessor(i.train_min_sizes, i.test_min_size, i.max_size, i.pixel_mean, i.pixel_std,
                        pixel_scale=i.pixel_scale, channel_order=i.channel_order,
                        size_divisibility=i.size_divisibility, resize=i.resize)


def build_matcher(m: MatcherConfig) -> AnchorMatcher:
    return AnchorMatcher(m.fg_iou_threshold, m.bg_iou_threshold, allow_low_quality_matches=m.allow_low_quality_matches,
                         crowd_ioa_threshold=m.crowd_ioa_threshold)


def build_retinanet(cfg: ModelConfig) -> RetinaNet:
    backbone = ResNetBackbone(cfg.backbone.depth, cfg.backbone.norm, cfg.backbone.freeze_at, cfg.backbone.stride_in_1x1)
    fpn = FPN(backbone.out_channels, cfg.fpn.out_channels, cfg.fpn.p6_source)
    anchor_generator = build_anchor_generator(cfg.anchors)
    head = RetinaNetHead(cfg.fpn.out_channels, anchor_generator.num_anchors, cfg.num_classes, cfg.head.num_convs,
                         cfg.head.norm, cfg.head.prior_prob)
    box_coder = BoxCoder(tuple(cfg.box_coding.weights), cfg.box_coding.scale_clamp)
    lc = cfg.loss
    loss = RetinaNetLoss(box_coder, focal_alpha=lc.focal_alpha, focal_gamma=lc.focal_gamma, box_loss=lc.box_loss,
                         smooth_l1_beta=lc.smooth_l1_beta, box_loss_weight=lc.box_loss_weight,
                         normalization=lc.normalization, ema_momentum=lc.ema_momentum, ema_initial=lc.ema_initial)
    n = cfg.inference
    postprocessor = PostProcessor(box_coder, score_threshold=n.score_threshold, topk_candidates=n.topk_candidates,
                                  nms_threshold=n.nms_threshold, detections_per_image=n.detections_per_image,
                                  clip_boxes=n.clip_boxes, min_box_size=n.min_box_size, candidates=n.candidates,
                                  nms_pre_per_class=n.nms_pre_per_class)
    model = RetinaNet(backbone, fpn, head, anchor_generator, build_preprocessor(cfg.input), build_matcher(cfg.matcher),
                      loss, postprocessor, cfg.class_names)
    model.config = cfg
    return model
