"""Test-time augmentation: the detector run on several views of each image (mirrored, at
other input sizes), their detections mapped back to the original image and merged."""

from __future__ import annotations

import copy

import torch

from .postprocess import grouped_nms

MERGES = ("nms", "wbf")


class TestTimeAugmentation:
    """The views of an image and how their detections are merged.

    Views: the model's own input (`model.input.test_min_size`), and one per entry of `sizes`
    (a short side, with the long-side cap `max_size` scaled by the same factor, so that each
    is the model's input scaled); with `flip`, each of those also mirrored left-right. Every
    view's detections come back in the original image's pixels (a mirrored view's boxes
    mirrored back: x -> width - x), and each image's are merged per class by `merge`:
    "nms", greedy NMS at the model's NMS threshold, or "wbf", weighted box fusion at that IoU
    (`weighted_box_fusion`); the best `detections_per_image` are kept.
    """

    __test__ = False  # not a pytest class

    def __init__(self, flip: bool = False, sizes: list[int] | tuple[int, ...] = (), merge: str = "nms"):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
        if any(size < 1 for size in sizes):
            raise ValueError(f"sizes must be positive, got {list(sizes)}")
        self.flip = flip
        self.sizes = tuple(int(size) for size in sizes)
        self.merge = merge

    def __repr__(self) -> str:
        return f"TestTimeAugmentation(flip={self.flip}, sizes={list(self.sizes)}, merge={self.merge!r})"

    def num_views(self, test_min_size: int) -> int:
        """How many views an image makes (the model's own input counted once)."""
        return len(self.min_sizes(test_min_size)) * (2 if self.flip else 1)

    def min_sizes(self, test_min_size: int) -> list[int]:
        """The short sides of the views: the model's own first, then the extra ones, once each."""
        return list(dict.fromkeys([test_min_size, *self.sizes]))

    @torch.inference_mode()
    def __call__(self, model, images: list[torch.Tensor], score_threshold: float | None = None) -> list[dict]:
        """Merged detections of `images` (`(3, H, W)` tensors on the model's device), per image
        `{"boxes" (D, 4), "scores" (D,), "labels" (D,)}` in original-image pixels, best first,
        as `model(images)` in eval mode gives them."""
        views = self.view_detections(model, images, score_threshold)
        post = model.postprocessor
        return [merge_views(per_image, self.merge, post.nms_threshold, post.detections_per_image,
                            self.num_views(model.preprocessor.test_min_size)) for per_image in views]

    def view_detections(self, model, images: list[torch.Tensor],
                        score_threshold: float | None = None) -> list[list[dict]]:
        """Per image, the detections of each view, mapped back to the original image. The
        views of one size (the images and their mirrors) run as one batch."""
        preprocessor = model.preprocessor
        if self.sizes and not preprocessor.resize:
            raise ValueError("test-time augmentation at other sizes needs a model that resizes its input "
                             "(model.input.resize is false)")
        out: list[list[dict]] = [[] for _ in images]
        for min_size in self.min_sizes(preprocessor.test_min_size):
            inputs = list(images) + ([image.flip(-1) for image in images] if self.flip else [])
            batch, _ = scaled_preprocessor(preprocessor, min_size)(inputs)
            logits, deltas, anchors = model.run_network(batch.tensor)
            for i, det in enumerate(model.forward_inference(logits, deltas, anchors, batch, score_threshold)):
                if i >= len(images):
                    det = dict(det, boxes=mirror_boxes(det["boxes"], images[i - len(images)].shape[-1]))
                out[i % len(images)].append(det)
        return out


def scaled_preprocessor(preprocessor, min_size: int):
    """`preprocessor` (a `Preprocessor`) resizing test images to short side `min_size`, its
    long-side cap scaled alike; itself for its own test size."""
    if min_size == preprocessor.test_min_size:
        return preprocessor
    scaled = copy.copy(preprocessor)
    scaled.test_min_size = min_size
    scaled.max_size = max(1, round(preprocessor.max_size * min_size / preprocessor.test_min_size))
    return scaled


def mirror_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """`(N, 4)` xyxy boxes of a left-right mirrored image `width` px wide, in the unmirrored
    image: x1' = width - x2, x2' = width - x1 (y unchanged)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def merge_views(views: list[dict], merge: str, iou_threshold: float, max_detections: int,
                num_views: int | None = None) -> dict:
    """One image's detections from several views, `{"boxes", "scores", "labels"}` each, merged
    per class by "nms" or "wbf" (`weighted_box_fusion` over `num_views`, default `len(views)`);
    the best `max_detections`, best first."""
    boxes = torch.cat([v["boxes"] for v in views]).float()
    scores = torch.cat([v["scores"] for v in views]).float()
    labels = torch.cat([v["labels"] for v in views])
    if merge == "wbf":
        boxes, scores, labels = weighted_box_fusion(boxes, scores, labels, iou_threshold, num_views or len(views))
        keep = scores.argsort(descending=True, stable=True)
    elif merge == "nms":
        keep = grouped_nms(boxes, scores, labels, iou_threshold)
    else:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    keep = keep[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def weighted_box_fusion(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float,
                        num_views: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted box fusion (Solovyev et al. 2019) of detections pooled from `num_views` views.

    Args:
        boxes `(N, 4)` xyxy, scores `(N,)`, labels `(N,)`: every view's detections.
    Returns:
        `(boxes (M, 4), scores (M,), labels (M,))`, one per cluster, in the order of the
        clusters' best members (best first).

    Clusters, within each class: greedy NMS at `iou_threshold` picks the leaders (best first;
    each leader overlaps no better leader by IoU > threshold), and every detection joins the
    best leader of its class that it overlaps by IoU > threshold (a leader joins itself). A
    cluster of n detections gives the score-weighted mean of their coordinates and the score
    sum(scores) / max(n, num_views): the mean score, lowered in proportion for a cluster that
    fewer views than all found (`ensemble_boxes`' "avg" rescaling). Unlike the original's
    sequential matching against each cluster's running fused box, members are matched
    against the leader, which makes the whole computation a few tensor operations.
    """
    if len(boxes) == 0:
        return boxes, scores, labels
    leaders = grouped_nms(boxes, scores, labels, iou_threshold)  # best first
    lead = boxes[leaders].double()
    inter = (torch.minimum(boxes[:, None, 2:].double(), lead[None, :, 2:])
             - torch.maximum(boxes[:, None, :2].double(), lead[None, :, :2])).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).double().prod(-1)
    lead_area = (lead[:, 2:] - lead[:, :2]).prod(-1)
    iou = inter / (area[:, None] + lead_area[None, :] - inter)
    same_class = labels[:, None] == labels[leaders][None, :]  # (N, K)
    joins = (iou > iou_threshold) & same_class
    joins[leaders, torch.arange(len(leaders), device=boxes.device)] = True
    # a box NMS suppressed overlaps a leader of its class by more than the threshold; should
    # rounding put that IoU at the threshold here, it joins its class's nearest leader
    nearest = iou.nan_to_num(-1.0).masked_fill(~same_class, -2.0).argmax(1)
    cluster = torch.where(joins.any(1), joins.int().argmax(1), nearest)  # argmax: the first, best, leader
    weight = scores.double()
    fused = torch.zeros(len(leaders), 4, dtype=torch.float64, device=boxes.device)
    fused.index_add_(0, cluster, boxes.double() * weight[:, None])
    total = torch.zeros(len(leaders), dtype=torch.float64, device=boxes.device).index_add_(0, cluster, weight)
    count = torch.zeros(len(leaders), dtype=torch.float64, device=boxes.device).index_add_(
        0, cluster, torch.ones_like(weight))
    fused = torch.where(total[:, None] > 0, fused / total[:, None], lead)  # all scores 0: the leader
    fused_scores = total / count.clamp(min=num_views)
    return fused.to(boxes.dtype), fused_scores.to(scores.dtype), labels[leaders]
