"""Turning head outputs into detections, batched over images and levels."""

from __future__ import annotations

import torch
from torchvision.ops import nms

from .box_coding import BoxCoder


class PostProcessor:
    """Sigmoid scores -> per level top-k over a threshold -> decode -> clip -> class-aware
    NMS -> best `detections_per_image` -> drop empty boxes.

    All images are processed together (one top-k per level for the whole batch, one
    decode) up to NMS, which runs per image, all classes in one call; detections are
    identical to processing the images one at a time.

    `clip_boxes`: "before_nms" (torchvision, the paper's reproductions), "after_nms"
    (detectron2: NMS on unclipped boxes; the caller clips in original-image pixels with
    `clip_and_drop_empty`) or "none" (PaddleDetection).

    `candidates="per_class"` takes the top-k (anchor, class) pairs of a level (torchvision,
    detectron2); `"per_anchor"` the top-k anchors by their best class score, with all their
    classes (PaddleDetection). `nms_pre_per_class > 0` lets at most that many boxes of a class
    into NMS (PaddleDetection's `nms_top_k`).
    """

    def __init__(self, box_coder: BoxCoder, score_threshold: float = 0.05, topk_candidates: int = 1000,
                 nms_threshold: float = 0.5, detections_per_image: int = 100, clip_boxes: str = "before_nms",
                 min_box_size: float = 0.0, candidates: str = "per_class", nms_pre_per_class: int = 0):
        if clip_boxes not in ("before_nms", "after_nms", "none"):
            raise ValueError(f"clip_boxes must be 'before_nms', 'after_nms' or 'none', got {clip_boxes!r}")
        if candidates not in ("per_class", "per_anchor"):
            raise ValueError(f"candidates must be 'per_class' or 'per_anchor', got {candidates!r}")
        self.candidates = candidates
        self.nms_pre_per_class = nms_pre_per_class
        self.box_coder = box_coder
        self.score_threshold = score_threshold
        self.topk_candidates = topk_candidates
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.clip_boxes = clip_boxes
        self.min_box_size = min_box_size

    def __call__(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                 image_sizes: list[tuple[int, int]], score_threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """
        Args:
            logits: per level `(B, A_l, K)`; deltas: per level `(B, A_l, 4)`; anchors: per level `(A_l, 4)`.
            image_sizes: `(h, w)` of each image before padding, for clipping.
        Returns:
            per image `{"boxes": (D, 4), "scores": (D,), "labels": (D,)}`, best first.
        """
        boxes, scores, labels, keep = self.gather_candidates(logits, deltas, anchors, image_sizes, score_threshold)
        # Candidates are image-major after masking, so one count per image splits them: the
        # only read back from the device. NMS then runs image by image: its cost grows with
        # the square of the boxes it is given (on a GPU, one call over a batch of 32 took 0.6 s).
        counts = keep.sum(1).tolist()
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        num_classes = logits[0].shape[-1]
        results = []
        for image_boxes, image_scores, image_labels in zip(boxes.split(counts), scores.split(counts),
                                                           labels.split(counts)):
            if self.nms_pre_per_class > 0:
                best_first = image_scores.argsort(descending=True, stable=True)
                best_first = _first_n_per_group(best_first, image_labels[best_first], self.nms_pre_per_class,
                                                num_classes)
                image_boxes, image_scores, image_labels = (t[best_first] for t in (image_boxes, image_scores,
                                                                                   image_labels))
            kept = first_kept(image_boxes, image_scores, image_labels, self.nms_threshold, self.detections_per_image)
            results.append({"boxes": image_boxes[kept], "scores": image_scores[kept], "labels": image_labels[kept]})
        return results

    def gather_candidates(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                          image_sizes: list[tuple[int, int]], score_threshold: float | None = None):
        """Every image's candidates before NMS, as padded batch tensors: boxes `(B, C, 4)`
        (decoded, clipped unless `clip_boxes` is "after_nms"), scores `(B, C)`, labels `(B, C)`
        and `keep (B, C)`, the ones over the score threshold and not empty. Reads nothing back."""
        threshold = self.score_threshold if score_threshold is None else score_threshold
        device = logits[0].device
        boxes, scores, labels = [], [], []
        for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
            top_logits, anchor_idx, label = self._level_candidates(level_logits)
            picked = torch.gather(level_deltas, 1, anchor_idx[..., None].expand(-1, -1, 4))
            boxes.append(self.box_coder.decode(picked.float(), level_anchors[anchor_idx]))
            scores.append(torch.sigmoid(top_logits.float()))
            labels.append(label)
        boxes, scores, labels = torch.cat(boxes, 1), torch.cat(scores, 1), torch.cat(labels, 1)  # (B, C, ...)

        sizes = torch.tensor(image_sizes, dtype=boxes.dtype, device=device)  # (B, 2) as (h, w)
        keep = scores > threshold
        if self.clip_boxes == "before_nms":
            limit = sizes.flip(-1).repeat(1, 2)[:, None, :]  # (B, 1, 4) as (w, h, w, h)
            boxes = torch.minimum(boxes.clamp(min=0), limit)
        if self.clip_boxes != "after_nms":
            keep &= (boxes[..., 2:] - boxes[..., :2] > self.min_box_size).all(-1)
        return boxes, scores, labels, keep

    def _level_candidates(self, level_logits: torch.Tensor):
        """Top candidates of one level `(B, A_l, K)`: logits, anchor index and label, each `(B, C)`."""
        batch, num_anchors, num_classes = level_logits.shape
        if self.candidates == "per_anchor":
            k = min(self.topk_candidates, num_anchors)
            anchor_idx = level_logits.max(-1).values.topk(k, dim=1).indices  # (B, k)
            top_logits = torch.gather(level_logits, 1, anchor_idx[..., None].expand(-1, -1, num_classes))
            labels = torch.arange(num_classes, device=level_logits.device).expand(batch, k, num_classes)
            anchor_idx = anchor_idx[..., None].expand(-1, -1, num_classes)
            return top_logits.reshape(batch, -1), anchor_idx.reshape(batch, -1), labels.reshape(batch, -1)
        flat = level_logits.reshape(batch, -1)
        k = min(self.topk_candidates, flat.shape[1])
        top_logits, top_idx = chunked_topk(flat, k)  # sigmoid is monotonic: select on logits
        return top_logits, top_idx // num_classes, top_idx % num_classes


def chunked_topk(values: torch.Tensor, k: int, chunks: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`values.topk(k, dim=1)` for `(B, N)` with large N: the top k of each of `chunks` slices
    first, then the top k of those. The same values (indices may differ among exact ties);
    torch's top-k runs one thread per row, so one long row (batch 1: 12M logits at P3 of an
    800x1216 image) took 4x longer than the slices, which run in parallel."""
    batch, n = values.shape
    if n < chunks * k * 4:
        return values.topk(k, dim=1)
    width = n // chunks
    main = values[:, : chunks * width].reshape(batch, chunks, width)
    top, idx = main.topk(k, dim=2)
    idx = idx + torch.arange(0, chunks * width, width, device=values.device)[None, :, None]
    top, idx = top.reshape(batch, -1), idx.reshape(batch, -1)
    if chunks * width < n:  # the few left over
        top = torch.cat([top, values[:, chunks * width :]], dim=1)
        idx = torch.cat([idx, torch.arange(chunks * width, n, device=values.device).expand(batch, -1)], dim=1)
    best, pick = top.topk(k, dim=1)
    return best, torch.gather(idx, 1, pick)


def first_kept(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
               count: int) -> torch.Tensor:
    """The first `count` boxes that `grouped_nms` keeps, best first, found among the best
    `8 * count` boxes when they hold that many, else among all. Exact: whether greedy NMS
    keeps a box depends only on the boxes scored above it. NMS costs the square of its input
    (and on a GPU runs one box at a time), so 800 boxes instead of 5,000 cost ~40x less."""
    shortlist = 8 * count
    if len(scores) > shortlist:
        best = scores.argsort(descending=True, stable=True)[:shortlist]
        kept = grouped_nms(boxes[best], scores[best], groups[best], iou_threshold)
        if len(kept) >= count:
            return best[kept[:count]]
    return grouped_nms(boxes, scores, groups, iou_threshold)[:count]


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """NMS within each group (class): indices of the kept boxes, best first.

    Boxes are shifted apart per group in float64: the shifts (~1e5 px for 91 classes) leave
    float32 coordinates exact there, whereas in float32 they would round them to ~0.01 px.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.double()
    shift = groups.to(boxes.dtype) * (boxes.max() - boxes.min() + 1).ceil()
    return nms(boxes + shift[:, None], scores.double(), iou_threshold)


def clip_and_drop_empty(result: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Clip one image's detection boxes to `size (h, w)` and drop those left empty."""
    h, w = size
    boxes = torch.stack([result["boxes"][:, 0].clamp(0, w), result["boxes"][:, 1].clamp(0, h),
                         result["boxes"][:, 2].clamp(0, w), result["boxes"][:, 3].clamp(0, h)], dim=1)
    keep = ((boxes[:, 2:] - boxes[:, :2]) > 0).all(1)
    return {"boxes": boxes[keep], "scores": result["scores"][keep], "labels": result["labels"][keep]}


def _first_n_per_group(order: torch.Tensor, group: torch.Tensor, n: int, num_groups: int) -> torch.Tensor:
    """Keep the first `n` entries of `order` for each group value, preserving order."""
    if order.numel() == 0:
        return order
    sorted_group, perm = torch.sort(group, stable=True)
    counts = torch.bincount(sorted_group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_group]
    selected = torch.zeros_like(group, dtype=torch.bool)
    selected[perm[rank < n]] = True
    return order[selected]
