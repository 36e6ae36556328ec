"""A generated COCO-format dataset of shapes on textured, cluttered backgrounds.

Used by the embedded demo and the tests: no download, deterministic by seed, and hard
enough to need a real detector (sizes 12-200 px, aspect ratios 1:2-2:1, colours, overlap,
distractor clutter).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPE_CLASSES = ["ellipse", "rectangle", "triangle", "star", "cross"]


def generate_dataset(root: str | Path, num_train: int, num_val: int, image_size: int = 256, seed: int = 0,
                     min_objects: int = 1, max_objects: int = 8, min_size: int = 12, max_size: int = 200) -> dict:
    """Write `root/{train,val}/*.jpg` and `root/annotations/{train,val}.json`.

    Returns the paths. A dataset already written with the same parameters is reused.
    """
    root = Path(root)
    params = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, min_objects=min_objects,
                  max_objects=max_objects, min_size=min_size, max_size=max_size)
    stamp = root / "dataset.json"
    paths = {
        "train_images": str(root / "train"), "train_annotations": str(root / "annotations" / "train.json"),
        "val_images": str(root / "val"), "val_annotations": str(root / "annotations" / "val.json"),
    }
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return paths
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, objects = render_image(rng, image_size, min_objects, max_objects, min_size, max_size)
            name = f"{image_id:06d}.jpg"
            image.save(folder / name, quality=92)
            images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
            for label, box in objects:
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(SHAPE_CLASSES)]
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
    stamp.write_text(json.dumps(params))
    return paths


def render_image(rng: np.random.Generator, size: int, min_objects: int, max_objects: int, min_size: int,
                 max_size: int) -> tuple[Image.Image, list[tuple[int, tuple[float, float, float, float]]]]:
    """One image and its objects as `(class index, (x0, y0, x1, y1))`."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    _clutter(rng, draw, size)
    objects: list[tuple[int, tuple[float, float, float, float]]] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(10):
            # log-uniform size so that small objects are as common as large ones
            extent = math.exp(rng.uniform(math.log(min_size), math.log(min(max_size, size - 2))))
            ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w = max(min_size, min(size - 2, extent * math.sqrt(ratio)))
            h = max(min_size, min(size - 2, extent / math.sqrt(ratio)))
            x0 = rng.uniform(0, size - w)
            y0 = rng.uniform(0, size - h)
            box = (x0, y0, x0 + w, y0 + h)
            if all(_covered(old, box) < 0.5 and _covered(box, old) < 0.5 for _, old in objects):
                break
        else:
            continue
        label = int(rng.integers(len(SHAPE_CLASSES)))
        _draw_shape(draw, label, box, _colour(rng))
        objects.append((label, tuple(round(v, 2) for v in box)))
    return image, objects


def render_large_scene(rng: np.random.Generator, width: int, height: int, count: int,
                       straddle: list[int] = ()) -> tuple[Image.Image, torch.Tensor]:
    """A large image of `count` non-touching discs of 12-40 px (one class) on a noisy
    background, every second one centred on one of the x positions `straddle` (tile borders,
    to test tiling); returns the image and the boxes `(count, 4)` xyxy."""
    from torchvision.ops import box_iou

    coarse = rng.integers(60, 120, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    background = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    image = Image.fromarray(np.clip(background + rng.integers(-12, 12, (height, width, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    while len(boxes) < count:
        size = float(rng.integers(12, 40))
        y = float(rng.integers(0, height - 60))
        x = straddle[len(boxes) % len(straddle)] - size / 2 if straddle and len(boxes) % 2 else \
            float(rng.integers(0, width - 60))
        box = [x, y, x + size, y + size * float(rng.uniform(0.7, 1.3))]
        if boxes and box_iou(torch.tensor([box]), torch.tensor(boxes)).max() > 0:
            continue
        boxes.append(box)
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(170, 256, 3)))
    return image, torch.tensor(boxes)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour noise + stripes + fine grain."""
    coarse = rng.uniform(40, 215, size=(4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 30)
    coord = np.arange(size, dtype=np.float32) * np.float32(2 * math.pi / period)
    phase = coord[None, :] * np.float32(math.cos(angle)) + coord[:, None] * np.float32(math.sin(angle))
    base += (np.sin(phase) * np.float32(rng.uniform(5, 25)))[..., None]
    base += rng.standard_normal(base.shape, dtype=np.float32) * np.float32(8)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Lines and specks that are not objects."""
    for _ in range(int(rng.integers(3, 10))):
        points = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(points, fill=_colour(rng), width=int(rng.integers(1, 4)))
    for _ in range(int(rng.integers(5, 20))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(1, 4)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _covered(a, b) -> float:
    """Fraction of box `a` covered by box `b`."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max((a[2] - a[0]) * (a[3] - a[1]), 1e-6)


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, box, colour) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    name = SHAPE_CLASSES[label]
    if name == "ellipse":
        draw.ellipse(box, fill=colour)
    elif name == "rectangle":
        draw.rectangle(box, fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif name == "star":
        unit = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        ux0, ux1 = min(p[0] for p in unit), max(p[0] for p in unit)
        uy0, uy1 = min(p[1] for p in unit), max(p[1] for p in unit)
        draw.polygon([(x0 + (px - ux0) / (ux1 - ux0) * w, y0 + (py - uy0) / (uy1 - uy0) * h) for px, py in unit],
                     fill=colour)
    else:  # cross
        t = 0.32
        draw.rectangle((cx - w * t / 2, y0, cx + w * t / 2, y1), fill=colour)
        draw.rectangle((x0, cy - h * t / 2, x1, cy + h * t / 2), fill=colour)
