"""Anchor-to-ground-truth assignment by IoU, for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def batched_intersection(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Intersection areas between `gt (B, G, 4)` and `anchors (A, 4)`: `(B, G, A)`."""
    lt = torch.maximum(gt[..., None, :2], anchors[:, :2])
    rb = torch.minimum(gt[..., None, 2:], anchors[:, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def batched_iou(gt: torch.Tensor, anchors: torch.Tensor, inter: torch.Tensor | None = None) -> torch.Tensor:
    """IoU between `gt (B, G, 4)` and `anchors (A, 4)`: `(B, G, A)`; `inter`: their
    `batched_intersection`, when the caller has it already."""
    inter = batched_intersection(gt, anchors) if inter is None else inter
    union = box_area(gt)[..., None] + box_area(anchors) - inter
    return inter / union


@dataclass
class Matches:
    """`gt_index (B, A)`: the GT each anchor is matched to (meaningful where foreground);
    `labels (B, A)`: FOREGROUND (1), BACKGROUND (0) or IGNORE (-1)."""

    gt_index: torch.Tensor
    labels: torch.Tensor


class AnchorMatcher:
    """Labels anchors by their best IoU with the image's ground truth.

    IoU >= `fg_iou_threshold` is foreground, < `bg_iou_threshold` background, in between
    ignored. With `allow_low_quality_matches`, each GT's highest-IoU anchors (ties included,
    IoU > 0) become foreground too, matched to their own best GT. Crowd boxes match nothing;
    background anchors that a crowd box covers by `crowd_ioa_threshold` of their area are
    ignored instead.
    """

    def __init__(self, fg_iou_threshold: float = 0.5, bg_iou_threshold: float = 0.4,
                 allow_low_quality_matches: bool = True, crowd_ioa_threshold: float = 0.5):
        if bg_iou_threshold > fg_iou_threshold:
            raise ValueError("bg_iou_threshold must not exceed fg_iou_threshold")
        self.fg_iou_threshold = fg_iou_threshold
        self.bg_iou_threshold = bg_iou_threshold
        self.allow_low_quality_matches = allow_low_quality_matches
        self.crowd_ioa_threshold = crowd_ioa_threshold

    def __call__(self, anchors: torch.Tensor, gt_boxes: torch.Tensor, gt_valid: torch.Tensor,
                 gt_crowd: torch.Tensor | None = None) -> Matches:
        """
        Args:
            anchors: `(A, 4)`.
            gt_boxes: `(B, G, 4)`, padded; `gt_valid (B, G)` marks real boxes.
            gt_crowd: `(B, G)` bool, crowd boxes (only among valid ones); optional.
        """
        batch, num_anchors = gt_boxes.shape[0], anchors.shape[0]
        if gt_boxes.shape[1] == 0:
            zeros = torch.zeros(batch, num_anchors, dtype=torch.long, device=anchors.device)
            return Matches(zeros, zeros.to(torch.int8))
        # Dense selects only (torch.where, no boolean indexing, no `if tensor`): no host
        # synchronisation, so that a GPU step runs without stalls and compiles as one graph.
        crowd = gt_crowd & gt_valid if gt_crowd is not None else torch.zeros_like(gt_valid)
        matchable = gt_valid & ~crowd
        inter = batched_intersection(gt_boxes, anchors)  # kept for the crowd boxes' IoA below
        iou = batched_iou(gt_boxes, anchors, inter).masked_fill_(~matchable[..., None], -1.0)
        best_iou, gt_index = iou.max(dim=1)

        labels = torch.where(best_iou >= self.fg_iou_threshold, FOREGROUND,
                             torch.where(best_iou < self.bg_iou_threshold, BACKGROUND, IGNORE)).to(torch.int8)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values
            is_best = (iou == best_per_gt) & (best_per_gt > 0)
            labels = torch.where(is_best.any(dim=1), FOREGROUND, labels).to(torch.int8)
        if gt_crowd is not None:
            ioa = inter.masked_fill_(~crowd[..., None], 0.0).max(dim=1).values / box_area(anchors).clamp(min=1e-6)
            labels = torch.where((labels == BACKGROUND) & (ioa >= self.crowd_ioa_threshold), IGNORE, labels)
        return Matches(gt_index, labels)
