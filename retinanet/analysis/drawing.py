"""Drawing with Pillow, for every picture the package makes: detections with legible labels
(predict, the demo, `retinanet augment`) and the colours the anchor views use. Works on numpy
arrays and uint8 tensors alike; imports no torch."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

CLASS_COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
                 (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
LEVEL_COLOURS = [(31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194)]


def enlarged(image: Image.Image, min_side: int = 512) -> tuple[Image.Image, int]:
    """The picture enlarged by a whole factor so that small inputs stay legible."""
    scale = max(1, min_side // max(image.width, image.height))
    image = image.convert("RGB")
    return (image.resize((image.width * scale, image.height * scale), Image.BILINEAR) if scale > 1
            else image.copy()), scale


def draw_detections(image, det: dict, max_boxes: int = 100, scale: int = 1, ground_truth=None) -> Image.Image:
    """The image, a `(3, H, W)` uint8 tensor or an `(H, W, 3)` uint8 array, enlarged `scale`
    times, with the `max_boxes` best boxes, their class names and scores on a dark label
    background (placed by `place_labels`, so that labels of overlapping boxes do not cover each
    other); `ground_truth (G, 4)` boxes, when given, outlined in white. A `det` without scores
    (annotations) is labelled by name."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy() if hasattr(image, "permute") else np.asarray(image))
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.BILINEAR)
    canvas = ImageDraw.Draw(pil)
    if ground_truth is not None:
        for box in (ground_truth * scale).tolist():
            canvas.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], outline=(255, 255, 255), width=1)
    scores = det["scores"].tolist() if "scores" in det else [None] * len(det["boxes"])
    shown = sorted(zip(scores, det["boxes"].tolist(), det["labels"].tolist(), det["class_names"]),
                   key=lambda d: -(d[0] or 0))[:max_boxes]
    boxes = [[v * scale for v in box] for _, box, _, _ in shown]
    colours = [CLASS_COLOURS[label % len(CLASS_COLOURS)] for _, _, label, _ in shown]
    texts = [name if score is None else f"{name} {score:.2f}" for score, _, _, name in shown]
    for box, colour in zip(boxes, colours):  # all boxes first: no box line crosses a label
        canvas.rectangle(box, outline=colour, width=2)
    extents = [canvas.textbbox((0, 0), text) for text in texts]
    sizes = [(right - left + 2, bottom - top + 2) for left, top, right, bottom in extents]
    for (x, y), text, size, (left, top, _, _), colour in zip(place_labels(boxes, sizes, pil.size), texts, sizes,
                                                             extents, colours):
        canvas.rectangle([x, y, x + size[0], y + size[1]], fill=(0, 0, 0))
        canvas.text((x + 1 - left, y + 1 - top), text, fill=colour)
    return pil


def place_labels(boxes: list[list[float]], sizes: list[tuple[int, int]],
                 image_size: tuple[int, int]) -> list[tuple[float, float]]:
    """Top-left corners for the labels of `boxes` (xyxy, best first) of `sizes` (w, h) in an
    image of `image_size` (w, h): each at the first of its box's top-left inside, above, bottom-left
    inside and below that stays in the image and overlaps no label placed before it; if none
    does, at the first that stays in the image."""
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x0, y0, _, y1), (w, h) in zip(boxes, sizes):
        x = min(max(x0 + 1, 0), max(width - w, 0))
        spots = [(x, y) for y in (y0 + 1, y0 - h - 1, y1 - h - 1, y1 + 1) if 0 <= y <= height - h] or [(x, 0)]
        free = [(sx, sy) for sx, sy in spots
                if not any(sx < r and px < sx + w and sy < b and py < sy + h for px, py, r, b in placed)]
        corner = (free or spots)[0]
        placed.append((corner[0], corner[1], corner[0] + w, corner[1] + h))
        corners.append(corner)
    return corners
