"""Building a `RetinaNet` from a `ModelConfig`: the only place that reads the config."""

from __future__ import annotations

from .anchors import AnchorGenerator
from .backbone import ResNetBackbone
from .box_coding import BoxCoder
from .config import ModelConfig
from .detector import RetinaNet
from .fpn import FPN
from .head import RetinaNetHead
from .losses import RetinaNetLoss
from .matching import AnchorMatcher
from .postprocess import PostProcessor
from .preprocess import Preprocessor


def build_retinanet(cfg: ModelConfig) -> RetinaNet:
    backbone = ResNetBackbone(cfg.backbone.depth, cfg.backbone.norm, cfg.backbone.freeze_at, cfg.backbone.stride_in_1x1)
    fpn = FPN(backbone.out_channels, cfg.fpn.out_channels, cfg.fpn.p6_source)
    a = cfg.anchors
    anchor_generator = AnchorGenerator(a.sizes, a.aspect_ratios, a.strides, a.offset, a.round_cell_anchors,
                                       a.stride_from_image_size)
    head = RetinaNetHead(cfg.fpn.out_channels, anchor_generator.num_anchors, cfg.num_classes, cfg.head.num_convs,
                         cfg.head.norm, cfg.head.prior_prob)
    i = cfg.input
    preprocessor = Preprocessor(i.train_min_sizes, i.test_min_size, i.max_size, i.pixel_mean, i.pixel_std,
                                i.pixel_scale, i.channel_order, i.size_divisibility, i.resize)
    box_coder = BoxCoder(tuple(cfg.box_coding.weights), cfg.box_coding.scale_clamp)
    m = cfg.matcher
    matcher = AnchorMatcher(m.fg_iou_threshold, m.bg_iou_threshold, m.allow_low_quality_matches, m.crowd_ioa_threshold)
    lc = cfg.loss
    loss = RetinaNetLoss(box_coder, lc.focal_alpha, lc.focal_gamma, lc.box_loss, lc.smooth_l1_beta,
                         lc.box_loss_weight, lc.normalization, lc.ema_momentum, lc.ema_initial)
    n = cfg.inference
    postprocessor = PostProcessor(box_coder, n.score_threshold, n.topk_candidates, n.nms_threshold,
                                  n.detections_per_image, n.clip_boxes, n.min_box_size, n.candidates,
                                  n.nms_pre_per_class)
    model = RetinaNet(backbone, fpn, head, anchor_generator, preprocessor, matcher, loss, postprocessor,
                      cfg.class_names)
    model.config = cfg
    return model

