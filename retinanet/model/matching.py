"""Anchor-to-ground-truth assignment by IoU, for a whole batch at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def batched_intersection(gt: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Intersection areas between `gt (B, G, 4)` and `anchors (A, 4)`: `(B, G, A)`.

    Each axis is overlapped on its own (no `(B, G, A, 2)` corner tensors): the same products
    of the same clamped differences, so the same numbers, at a third of the memory."""
    gt = gt[..., None, :]  # (B, G, 1, 4)
    width = torch.minimum(gt[..., 2], anchors[:, 2]).sub_(torch.maximum(gt[..., 0], anchors[:, 0])).clamp_(min=0)
    height = torch.minimum(gt[..., 3], anchors[:, 3]).sub_(torch.maximum(gt[..., 1], anchors[:, 1])).clamp_(min=0)
    return width.mul_(height)


def batched_iou(gt: torch.Tensor, anchors: torch.Tensor, inter: torch.Tensor | None = None) -> torch.Tensor:
    """IoU between `gt (B, G, 4)` and `anchors (A, 4)`: `(B, G, A)`; `inter`: their
    `batched_intersection`, when the caller has it already (left unchanged)."""
    inter = batched_intersection(gt, anchors) if inter is None else inter
    union = (box_area(gt)[..., None] + box_area(anchors)).sub_(inter)
    return torch.div(inter, union, out=union)


@dataclass
class Matches:
    """`gt_index (B, A)`: the GT each anchor is matched to (meaningful where foreground);
    `labels (B, A)`: FOREGROUND (1), BACKGROUND (0) or IGNORE (-1); `gt_best_iou (B, G)`:
    each GT's highest IoU with any anchor (-1 for padding and crowd boxes)."""

    gt_index: torch.Tensor
    labels: torch.Tensor
    gt_best_iou: torch.Tensor | None = None


class AnchorMatcher:
    """Labels anchors by their best IoU with the image's ground truth.

    IoU >= `fg_iou_threshold` is foreground, < `bg_iou_threshold` background, in between
    ignored. With `allow_low_quality_matches`, each GT's highest-IoU anchors (ties included,
    IoU > 0) become foreground too, matched to their own best GT. Crowd boxes match nothing;
    background anchors that a crowd box covers by `crowd_ioa_threshold` of their area are
    ignored instead.

    The IoU matrix is never held whole: the GT boxes are taken a chunk at a time, at most
    `chunk_elements` IoUs per chunk (batch x GT x anchors), and only running maxima over them
    are kept, so memory stays the same however many boxes an image has (on a GPU the chunks
    are 16 times larger: fewer kernel launches). Every result is the one the whole matrix
    would give, bit for bit (maxima and first-index argmax are exact).
    """

    chunk_elements = 1 << 22

    def __init__(self, fg_iou_threshold: float = 0.5, bg_iou_threshold: float = 0.4, *,
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
        batch, num_gt, num_anchors = gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[0]
        if num_gt == 0:
            zeros = torch.zeros(batch, num_anchors, dtype=torch.long, device=anchors.device)
            return Matches(zeros, zeros.to(torch.int8), gt_boxes.new_zeros(batch, 0))
        # Dense selects only (torch.where, no boolean indexing, no `if tensor`): no host
        # synchronisation, so that a GPU step runs without stalls and compiles as one graph.
        # The chunk loop's length depends on shapes only.
        crowd = gt_crowd & gt_valid if gt_crowd is not None else torch.zeros_like(gt_valid)
        matchable = gt_valid & ~crowd
        # crowd IoA only where a crowd box can change a label (on a CPU in eager mode asking costs
        # nothing; a compiled graph cannot branch on a value, so it always computes it)
        with_crowd = gt_crowd is not None and (anchors.device.type != "cpu" or self.crowd_ioa_threshold <= 0
                                               or torch.compiler.is_compiling() or bool(crowd.any()))
        anchor_area = box_area(anchors)
        budget = self.chunk_elements * (16 if anchors.device.type == "cuda" else 1)
        step = max(1, budget // max(1, batch * num_anchors))
        best_iou = gt_index = is_best = crowd_inter = None
        gt_best = []
        for start in range(0, num_gt, step):
            stop = min(start + step, num_gt)
            inter = batched_intersection(gt_boxes[:, start:stop], anchors)  # (B, g, A)
            if with_crowd:
                chunk_crowd = inter.masked_fill(~crowd[:, start:stop, None], 0.0).amax(dim=1)
                crowd_inter = chunk_crowd if crowd_inter is None else torch.maximum(crowd_inter, chunk_crowd)
            union = (box_area(gt_boxes[:, start:stop])[..., None] + anchor_area).sub_(inter)
            iou = torch.div(inter, union, out=union).masked_fill_(~matchable[:, start:stop, None], -1.0)
            chunk_best, chunk_index = iou.max(dim=1)
            if best_iou is None:
                best_iou, gt_index = chunk_best, chunk_index
            else:  # the first GT wins ties and NaN counts as the largest, as in `max` over all GTs
                better = (chunk_best > best_iou) | (chunk_best.isnan() & ~best_iou.isnan())
                best_iou = torch.where(better, chunk_best, best_iou)
                gt_index = torch.where(better, chunk_index + start, gt_index)
            best_per_gt = iou.amax(dim=2, keepdim=True)  # (B, g, 1)
            gt_best.append(best_per_gt[..., 0])
            if self.allow_low_quality_matches:  # NaN where the best is not > 0: equal to nothing
                chunk_is_best = (iou == best_per_gt.where(best_per_gt > 0, torch.nan)).any(dim=1)
                is_best = chunk_is_best if is_best is None else is_best.logical_or_(chunk_is_best)
            del inter, union, iou

        labels = torch.where(best_iou >= self.fg_iou_threshold, FOREGROUND,
                             torch.where(best_iou < self.bg_iou_threshold, BACKGROUND, IGNORE)).to(torch.int8)
        if is_best is not None:
            labels = torch.where(is_best, FOREGROUND, labels).to(torch.int8)
        if with_crowd:
            ioa = crowd_inter / anchor_area.clamp(min=1e-6)
            labels = torch.where((labels == BACKGROUND) & (ioa >= self.crowd_ioa_threshold), IGNORE, labels)
        return Matches(gt_index, labels, torch.cat(gt_best, 1))
