"""Anchor coverage: which ground-truth boxes can the anchors reach, and how well.

Everything is computed as training sees it: each image is resized by the model's own
pre-processing rule, anchors are laid on the real grid of every level (the feature sizes of
the padded input), and positives come from the model's own matcher. Tensors in, tensors
out; no files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.build import build_anchor_generator, build_matcher, build_preprocessor
from ..model.config import AnchorConfig, InputConfig, MatcherConfig
from ..model.matching import FOREGROUND
from ..model.preprocess import Preprocessor


@dataclass
class ImageBoxes:
    """One image's ground truth in original pixels: `boxes (G, 4)` xyxy, `labels (G,)`,
    `crowd (G,)` bool."""

    height: int
    width: int
    boxes: torch.Tensor
    labels: torch.Tensor
    crowd: torch.Tensor


@dataclass
class Coverage:
    """Per (non-crowd) ground-truth box, after resizing: `width`, `height` (N,), `labels`
    (N,), `best_iou` (N,) with any anchor, and `positives` (N,): anchors the matcher makes
    foreground for it."""

    width: torch.Tensor
    height: torch.Tensor
    labels: torch.Tensor
    best_iou: torch.Tensor
    positives: torch.Tensor

    def __len__(self) -> int:
        return len(self.best_iou)


def feature_sizes(padded: tuple[int, int], strides: list[int]) -> list[tuple[int, int]]:
    """The `(H, W)` of each level for a padded input: ResNet and the FPN's extra stride-2
    convs halve with rounding up, so a level of stride 2^k is `padded` halved k times."""
    sizes = []
    for stride in strides:
        h, w = padded
        if stride & (stride - 1) == 0:
            for _ in range(int(math.log2(stride))):
                h, w = (h + 1) // 2, (w + 1) // 2
        else:
            h, w = math.ceil(h / stride), math.ceil(w / stride)
        sizes.append((h, w))
    return sizes


def network_input_size(height: int, width: int, min_size: int, preprocessor: Preprocessor) -> tuple[tuple[int, int],
                                                                                                   tuple[int, int],
                                                                                                   float, float]:
    """`(resized (h, w), padded (h, w), scale_y, scale_x)` for an image of `height x width`."""
    if preprocessor.resize:
        scale = preprocessor.scale_factor((height, width), min_size)
        h, w = int(math.floor(height * scale)), int(math.floor(width * scale))
    else:
        h, w = height, width
    d = preprocessor.size_divisibility
    padded = (math.ceil(h / d) * d, math.ceil(w / d) * d) if d > 1 else (h, w)
    return (h, w), padded, h / height, w / width


def anchor_coverage(images: list[ImageBoxes], anchors: AnchorConfig, matcher: MatcherConfig,
                    input_cfg: InputConfig, min_sizes: list[int] | None = None) -> Coverage:
    """Coverage of every non-crowd box of `images`. Image i is resized to short side
    `min_sizes[i % len(min_sizes)]` (default: the training sizes, round robin)."""
    generator = build_anchor_generator(anchors)
    match = build_matcher(matcher)
    pre = build_preprocessor(input_cfg)
    sizes = list(min_sizes or input_cfg.train_min_sizes)
    out = {k: [] for k in ("width", "height", "labels", "best_iou", "positives")}
    for i, image in enumerate(images):
        if len(image.boxes) == 0:
            continue
        _, padded, sy, sx = network_input_size(image.height, image.width, sizes[i % len(sizes)], pre)
        boxes = image.boxes.float() * torch.tensor([sx, sy, sx, sy])
        grid = torch.cat(generator(feature_sizes(padded, anchors.strides), padded))
        valid = torch.ones(1, len(boxes), dtype=torch.bool)
        matches = match(grid, boxes[None], valid, image.crowd[None].bool())
        fg = matches.labels[0] == FOREGROUND
        positives = torch.bincount(matches.gt_index[0][fg], minlength=len(boxes))
        keep = ~image.crowd.bool()
        best = matches.gt_best_iou[0]  # each box's best IoU with any anchor (crowd boxes: -1, dropped)
        out["width"].append((boxes[:, 2] - boxes[:, 0])[keep])
        out["height"].append((boxes[:, 3] - boxes[:, 1])[keep])
        out["labels"].append(image.labels[keep])
        out["best_iou"].append(best[keep])
        out["positives"].append(positives[keep])
    if not out["width"]:
        empty = torch.zeros(0)
        return Coverage(empty, empty, empty.long(), empty, empty.long())
    return Coverage(**{k: torch.cat(v) for k, v in out.items()})


# ------------------------------------------------------------------------------ summaries
COCO_AREAS = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))


def summarize(coverage: Coverage, matcher: MatcherConfig, anchors: AnchorConfig,
              class_names: list[str] | None = None) -> dict:
    """The report: shares of boxes uncovered (no anchor at IoU >= fg threshold), with no
    anchor even at the bg threshold, and with zero positives; overall, by size bucket (COCO
    areas after resizing, and the anchor size octaves) and by class."""
    report = {"boxes": len(coverage), **_shares(coverage, torch.ones(len(coverage), dtype=torch.bool), matcher)}
    area = coverage.width * coverage.height
    by_size = {}
    for name, lo, hi in COCO_AREAS:
        by_size[f"coco_{name}"] = _shares(coverage, (area >= lo) & (area < hi), matcher)
    side = area.sqrt()
    edges = [level[0] for level in anchors.sizes]
    bounds = [0.0] + [e / math.sqrt(2) for e in edges] + [float("inf")]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        label = f"side {lo:.0f}-{hi:.0f} px" if math.isfinite(hi) else f"side >= {lo:.0f} px"
        by_size[label] = _shares(coverage, (side >= lo) & (side < hi), matcher)
    report["by_size"] = by_size
    by_class = {}
    for label in sorted(set(coverage.labels.tolist())):
        name = class_names[label] if class_names and label < len(class_names) else str(label)
        by_class[name] = _shares(coverage, coverage.labels == label, matcher)
    report["by_class"] = by_class
    return report


def _shares(coverage: Coverage, mask: torch.Tensor, matcher: MatcherConfig) -> dict:
    n = int(mask.sum())
    if n == 0:
        return {"boxes": 0, "uncovered_fraction": None, "below_bg_fraction": None, "zero_positive_fraction": None,
                "mean_positives": None, "mean_best_iou": None}
    best, positives = coverage.best_iou[mask], coverage.positives[mask].float()
    return {"boxes": n,
            "uncovered_fraction": round(float((best < matcher.fg_iou_threshold).float().mean()), 4),
            "below_bg_fraction": round(float((best < matcher.bg_iou_threshold).float().mean()), 4),
            "zero_positive_fraction": round(float((positives == 0).float().mean()), 4),
            "mean_positives": round(float(positives.mean()), 3),
            "mean_best_iou": round(float(best.mean()), 4)}
