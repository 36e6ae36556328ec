"""Metrics at a working threshold: precision, recall and F1 of the detections scored at or
above a score threshold, the threshold that maximises F1, and a confusion matrix.

Matching is COCO's, at one IoU: per image, detections in descending score each take the
still unmatched ground-truth box of highest IoU >= `iou_threshold`. Precision, recall and F1
match within a class (as COCO AP does); the confusion matrix matches regardless of class, so
that a box found under the wrong class shows up as a confusion. A detection that matches no
box but covers a crowd region of its class (intersection over the detection's area >=
`iou_threshold`) is ignored, as COCO ignores it: neither a true nor a false positive. Crowd regions are never
missed. Greedy matching by score means the matches of the detections above any threshold are
those of the whole run cut there, so one matching gives every threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from ..model.matching import batched_intersection, box_area


@dataclass
class ImageDetections:
    """One image's ground truth (`gt_boxes (G, 4)` xyxy, `gt_labels (G,)`, `gt_crowd (G,)`
    bool) and detections (`boxes (D, 4)` xyxy, `labels (D,)`, `scores (D,)`), labels
    contiguous, in the same pixels."""

    gt_boxes: torch.Tensor
    gt_labels: torch.Tensor
    gt_crowd: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


def match_image(image: ImageDetections, iou_threshold: float, class_aware: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gt_index (D,), ignored (D,))`: the non-crowd ground truth each detection is matched
    to (an index into the image's boxes, -1: none; of its own class when `class_aware`), and
    whether an unmatched detection lies on a crowd region of its class (a crowd region says
    "many of this class here": a detection of another class on it is an error either way)."""
    count = len(image.scores)
    gt_index = torch.full((count,), -1, dtype=torch.long)
    ignored = torch.zeros(count, dtype=torch.bool)
    if count == 0 or len(image.gt_boxes) == 0:
        return gt_index, ignored
    boxes, gt_boxes = image.boxes.double(), image.gt_boxes.double()
    same = image.labels[:, None] == image.gt_labels[None]
    crowd = image.gt_crowd.bool()
    iou = box_iou(boxes, gt_boxes)
    iou[(~same if class_aware else torch.zeros_like(same)) | crowd[None]] = -1.0
    candidates = (iou >= iou_threshold).numpy()
    iou = iou.numpy()
    taken = np.zeros(len(gt_boxes), dtype=bool)
    for d in torch.argsort(image.scores, descending=True, stable=True).tolist():
        free = candidates[d] & ~taken
        if free.any():
            g = int(np.argmax(np.where(free, iou[d], -1.0)))
            taken[g] = True
            gt_index[d] = g
    if crowd.any():
        ioa = batched_intersection(boxes[None], gt_boxes[crowd])[0].T / box_area(boxes).clamp(min=1e-12)[:, None]
        on_crowd = ((ioa >= iou_threshold) & same[:, crowd]).any(dim=1)
        ignored = on_crowd & (gt_index < 0)
    return gt_index, ignored


def _counts(tp: int, detections: int, positives: int) -> dict:
    """Precision, recall and F1 (`2TP / (2TP + FP + FN)`) with their counts; None where 0/0."""
    fp, fn = detections - tp, positives - tp
    return {"precision": tp / detections if detections else None,
            "recall": tp / positives if positives else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "tp": tp, "fp": fp, "fn": fn}


def best_f1(scores: torch.Tensor, tp: torch.Tensor, positives: int) -> dict:
    """The score threshold among the detections' own scores whose kept detections (score >=
    it) have the highest F1, the highest threshold among equals; `threshold` None when no
    threshold gets a true positive. `scores (N,)`, `tp (N,)` bool: the counted detections."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, tp = scores[order], tp[order].long()
    cum_tp = tp.cumsum(0)
    kept = torch.arange(1, len(scores) + 1)
    last_of_score = torch.ones(len(scores), dtype=torch.bool)  # a threshold keeps every tie
    last_of_score[:-1] = scores[1:] != scores[:-1]
    f1 = (2 * cum_tp / (kept + positives).clamp(min=1))[last_of_score]
    if len(f1) == 0 or float(f1.max()) == 0.0:
        return {"threshold": None, **_counts(0, 0, positives)}
    best = int(torch.nonzero(f1 == f1.max())[0])
    index = int(torch.nonzero(last_of_score)[best])
    return {"threshold": float(scores[index]), **_counts(int(cum_tp[index]), index + 1, positives)}


def threshold_metrics(images: list[ImageDetections], class_names: list[str], score_threshold: float = 0.5,
                      iou_threshold: float = 0.5) -> dict:
    """Per class and overall (pooled over classes): precision, recall, F1 and their counts at
    `score_threshold`, and `best_f1` (the threshold that maximises F1, searched among the
    detections' scores); and the confusion matrix at `score_threshold` with rows the ground-truth
    class then background (detections on nothing), columns the predicted class then background
    (boxes missed). Classes without ground truth or detections get None where 0/0."""
    num_classes = len(class_names)
    labels, scores, tps = [], [], []
    confusion = torch.zeros(num_classes + 1, num_classes + 1, dtype=torch.long)
    positives = torch.zeros(num_classes, dtype=torch.long)
    for image in images:
        keep = image.gt_crowd.logical_not()
        positives += torch.bincount(image.gt_labels[keep], minlength=num_classes)
        gt_index, ignored = match_image(image, iou_threshold, class_aware=True)
        counted = ~ignored
        labels.append(image.labels[counted])
        scores.append(image.scores[counted].double())
        tps.append(gt_index[counted] >= 0)
        confusion += _confusion(image, score_threshold, iou_threshold, num_classes)
    labels, scores, tps = (torch.cat(v) if v else torch.zeros(0, dtype=dt)
                           for v, dt in ((labels, torch.long), (scores, torch.float64), (tps, torch.bool)))
    above = scores >= score_threshold
    per_class = {}
    for c, name in enumerate(class_names):
        mine = labels == c
        per_class[name] = {**_counts(int((tps & mine & above).sum()), int((mine & above).sum()), int(positives[c])),
                           "best_f1": best_f1(scores[mine], tps[mine], int(positives[c]))}
    overall = {**_counts(int((tps & above).sum()), int(above.sum()), int(positives.sum())),
               "best_f1": best_f1(scores, tps, int(positives.sum()))}
    return {"score_threshold": score_threshold, "iou": iou_threshold, "overall": overall, "per_class": per_class,
            "confusion_matrix": {"labels": [*class_names, "background"], "rows": "ground truth",
                                 "columns": "predicted", "counts": confusion.tolist()}}


def _confusion(image: ImageDetections, score_threshold: float, iou_threshold: float, num_classes: int) -> torch.Tensor:
    """One image's `(K + 1, K + 1)` confusion counts, matching regardless of class."""
    keep = image.scores >= score_threshold
    kept = ImageDetections(image.gt_boxes, image.gt_labels, image.gt_crowd, image.boxes[keep], image.labels[keep],
                           image.scores[keep])
    gt_index, ignored = match_image(kept, iou_threshold, class_aware=False)
    background = num_classes
    matched = gt_index >= 0
    rows = torch.where(matched, image.gt_labels[gt_index.clamp(min=0)] if len(image.gt_labels) else gt_index,
                       background)[~ignored]
    columns = kept.labels[~ignored]
    missed = torch.ones(len(image.gt_labels), dtype=torch.bool)
    missed[gt_index[matched]] = False
    missed &= ~image.gt_crowd.bool()
    rows = torch.cat([rows, image.gt_labels[missed]])
    columns = torch.cat([columns, torch.full((int(missed.sum()),), background, dtype=torch.long)])
    flat = torch.bincount(rows * (num_classes + 1) + columns, minlength=(num_classes + 1) ** 2)
    return flat.view(num_classes + 1, num_classes + 1)


def images_from_results(records, results: list[dict], category_ids: list[int]) -> list[ImageDetections]:
    """`ImageDetections` for dataset `records` (`ImageRecord`s, labels indexing the dataset's
    `category_ids`) and COCO-format `results` (`bbox` [x, y, w, h]). Detections of categories
    the dataset does not have are left out, as COCOeval leaves them out."""
    label_of = {c: k for k, c in enumerate(category_ids)}
    by_image: dict[int, list[dict]] = {}
    for r in results:
        if r["category_id"] in label_of:
            by_image.setdefault(r["image_id"], []).append(r)
    images = []
    for record in records:
        found = by_image.get(record.image_id, [])
        xywh = torch.tensor([r["bbox"] for r in found], dtype=torch.float64).reshape(-1, 4)
        images.append(ImageDetections(
            gt_boxes=torch.tensor(record.boxes, dtype=torch.float64).reshape(-1, 4),
            gt_labels=torch.tensor(record.labels, dtype=torch.long),
            gt_crowd=torch.tensor(record.crowd, dtype=torch.bool),
            boxes=torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1),
            labels=torch.tensor([label_of[r["category_id"]] for r in found], dtype=torch.long),
            scores=torch.tensor([r["score"] for r in found], dtype=torch.float64)))
    return images


def format_threshold_line(metrics: dict) -> str:
    """One console line: overall precision, recall and F1 at the threshold, and the best F1."""
    overall = metrics["overall"]

    def show(v):
        return "n/a" if v is None else f"{v:.3f}"

    best = overall["best_f1"]
    tail = (f"; best F1 {show(best['f1'])} at score {best['threshold']:.3f}" if best["threshold"] is not None else "")
    return (f"at score >= {metrics['score_threshold']:.2f}, IoU {metrics['iou']:.2f}: precision "
            f"{show(overall['precision'])}  recall {show(overall['recall'])}  F1 {show(overall['f1'])}{tail}")
