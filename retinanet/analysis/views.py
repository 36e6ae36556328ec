"""Pictures of anchors and of the matcher's assignment, drawn with Pillow."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from ..model.build import build_anchor_generator
from ..model.config import AnchorConfig
from ..model.matching import FOREGROUND, IGNORE, AnchorMatcher, batched_iou
from .drawing import LEVEL_COLOURS, enlarged


def draw_anchor_grid(canvas: Image.Image, anchors: AnchorConfig, feature_sizes: list[tuple[int, int]],
                     level: int, location: tuple[float, float] | None = None) -> Image.Image:
    """The anchor centres of `level` over `canvas` (the network input), and the anchors of
    the grid location nearest `location` (x, y; default: the centre), coloured by size."""
    h, w = canvas.height, canvas.width
    canvas, k = enlarged(canvas)
    draw = ImageDraw.Draw(canvas)
    level_anchors = build_anchor_generator(anchors)(feature_sizes, (h, w))[level]
    per_location = build_anchor_generator(anchors).num_anchors
    cells = level_anchors.reshape(-1, per_location, 4)
    centres = (cells[:, 0, :2] + cells[:, 0, 2:]) / 2
    colour = LEVEL_COLOURS[level % len(LEVEL_COLOURS)]
    radius = max(1, min(3, anchors.strides[level] * k // 8))
    for x, y in (centres * k).tolist():
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    target = torch.tensor(location if location is not None else (w / 2, h / 2), dtype=torch.float32)
    nearest = int(((centres - target) ** 2).sum(-1).argmin())
    for i, box in enumerate((cells[nearest] * k).tolist()):
        shade = LEVEL_COLOURS[(i // len(anchors.aspect_ratios)) % len(LEVEL_COLOURS)]
        draw.rectangle(box, outline=shade, width=2)
    cx, cy = (centres[nearest] * k).tolist()
    draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=(255, 0, 0))
    draw.text((6, 6), f"P{level + 3}: stride {anchors.strides[level]}, {per_location} anchors per location "
                      f"({len(anchors.sizes[level])} sizes x {len(anchors.aspect_ratios)} ratios)", fill=(255, 255, 255))
    return canvas


def draw_assignment(image: Image.Image, boxes: torch.Tensor, anchors: AnchorConfig, matcher: AnchorMatcher,
                    feature_sizes: list[tuple[int, int]], crowd: torch.Tensor | None = None,
                    fg_iou_threshold: float = 0.5) -> tuple[Image.Image, dict]:
    """One network-input image with its ground truth (`boxes (G, 4)` in input pixels), the
    anchors the matcher makes positive (outlined, coloured by level) and ignored (dotted
    centres); boxes that no anchor reaches at `fg_iou_threshold` are drawn in red."""
    per_level = build_anchor_generator(anchors)(feature_sizes, (image.height, image.width))
    image, k = enlarged(image)
    draw = ImageDraw.Draw(image)
    grid = torch.cat(per_level)
    level_of = torch.cat([torch.full((len(a),), i) for i, a in enumerate(per_level)])
    crowd = torch.zeros(len(boxes), dtype=torch.bool) if crowd is None else crowd.bool()
    matches = matcher(grid, boxes[None], torch.ones(1, len(boxes), dtype=torch.bool), crowd[None])
    labels = matches.labels[0]
    for index in (labels == IGNORE).nonzero().flatten().tolist():
        x0, y0, x1, y1 = (grid[index] * k).tolist()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.ellipse([cx - 1, cy - 1, cx + 1, cy + 1], fill=(200, 200, 200))
    positive = (labels == FOREGROUND).nonzero().flatten()
    for index in positive.tolist():
        draw.rectangle((grid[index] * k).tolist(), outline=LEVEL_COLOURS[int(level_of[index]) % len(LEVEL_COLOURS)],
                       width=2)
    best = batched_iou(boxes[None], grid)[0].max(dim=1).values if len(boxes) else torch.zeros(0)
    uncovered = best < fg_iou_threshold
    for box, bad in zip((boxes * k).tolist(), uncovered.tolist()):
        draw.rectangle(box, outline=(255, 0, 0) if bad else (255, 255, 255), width=3)
    draw.text((6, 6), "red: no anchor at the fg IoU; positives: P3 blue, P4 green, P5 orange; dots: ignored",
              fill=(255, 255, 255))
    positives_per_box = torch.bincount(matches.gt_index[0][labels == FOREGROUND], minlength=len(boxes))
    summary = {"boxes": len(boxes), "uncovered": int(uncovered.sum()), "positive_anchors": len(positive),
               "ignored_anchors": int((labels == IGNORE).sum()), "positives_per_box": positives_per_box.tolist(),
               "best_iou": [round(v, 3) for v in best.tolist()],
               "positives_per_level": torch.bincount(level_of[positive], minlength=len(per_level)).tolist()}
    return image, summary
