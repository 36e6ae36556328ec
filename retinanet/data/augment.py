"""Training augmentations: the sampler draws each one's parameters (`draw_ops`), the dataset
applies them (`apply_ops`), so that a run is reproducible and resumable whatever the worker
processes. Every geometric op moves boxes exactly; boxes cut by a crop follow the rule of the
zoom crop and the tiles (`crop_boxes`): kept, turned into ignored regions (`iscrowd`), or
dropped. Images are `(C, H, W)` tensors, boxes xyxy pixels. Knows no model and no config: an op
is anything with the attributes of its `data.augment` entry (`kind`, `p` and its ranges).

Pixels go through torchvision's functional transforms where they are as fast or faster (colour,
resizing); flips and quarter turns of boxes are written out, being exact and quicker than
torchvision's box types."""

from __future__ import annotations

import torch
from torchvision.transforms.v2 import functional as F

# uniforms each op draws per item: the first decides whether it applies (< p), the rest its parameters
NUM_DRAWS = {"hflip": 1, "vflip": 1, "rotate90": 2, "photometric": 5, "scale_jitter": 4, "zoom_out": 4}


def draw_ops(ops, count: int, generator: torch.Generator) -> list[tuple]:
    """The parameters of `ops` for `count` items, one tuple per item with an entry per op: None
    where the op does not apply, else what `apply_ops` needs. Each op draws a fixed block of
    uniforms, so an op's draws do not depend on the others' outcomes."""
    columns = []
    for op in ops:
        uniforms = torch.rand(count, NUM_DRAWS[op.kind], generator=generator, dtype=torch.float64).tolist()
        columns.append([op_params(op, u) for u in uniforms])
    return list(zip(*columns)) if columns else [()] * count


def op_params(op, u: list[float]) -> tuple | None:
    """One op's parameters from its uniforms `u` in [0, 1)."""
    if u[0] >= op.p:
        return None
    if op.kind in ("hflip", "vflip"):
        return (op.kind,)
    if op.kind == "rotate90":
        return ("rotate90", 1 + min(int(u[1] * 3), 2))  # quarter turns counter-clockwise
    if op.kind == "photometric":
        ranges = (op.brightness, op.contrast, op.saturation, op.hue)
        return ("photometric", *(low + v * (high - low) for (low, high), v in zip(ranges, u[1:])))
    if op.kind == "scale_jitter":
        low, high = op.scale
        return ("rescale", low + u[1] * (high - low), u[2], u[3], op.min_visible, tuple(op.fill))
    if op.kind == "zoom_out":
        return ("rescale", 1 / (1 + u[1] * (op.max_scale - 1)), u[2], u[3], 1.0, tuple(op.fill))
    raise ValueError(f"unknown augmentation {op.kind!r}")


def apply_ops(image: torch.Tensor, target: dict, drawn: tuple) -> tuple[torch.Tensor, dict]:
    """`image` and `target` (boxes, labels, iscrowd) through the ops as drawn, in order."""
    for params in drawn:
        if params is None:
            continue
        kind, args = params[0], params[1:]
        if kind == "hflip":
            image, boxes = hflip(image, target["boxes"])
        elif kind == "vflip":
            image, boxes = vflip(image, target["boxes"])
        elif kind == "rotate90":
            image, boxes = rotate90(image, target["boxes"], *args)
        elif kind == "photometric":
            image, boxes = photometric(image, *args), target["boxes"]
        elif kind == "rescale":
            image, target = rescale(image, target, *args)
            continue
        else:
            raise ValueError(f"unknown augmentation {kind!r}")
        target = {**target, "boxes": boxes}
    return image, target


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image `(C, H, W)` and its xyxy boxes left-right."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def vflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image `(C, H, W)` and its xyxy boxes top-bottom."""
    height = image.shape[-2]
    flipped = boxes.clone()
    flipped[:, 1] = height - boxes[:, 3]
    flipped[:, 3] = height - boxes[:, 1]
    return image.flip(-2), flipped


def rotate90(image: torch.Tensor, boxes: torch.Tensor, turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an image `(C, H, W)` and its boxes by `turns` quarter turns counter-clockwise (as
    `torch.rot90`); a turn maps the point (x, y) to (y, W - x). Written out rather than
    torchvision's box rotation, which goes through sines and moves corners by ~1e-4 px."""
    for _ in range(turns % 4):
        width = image.shape[-1]
        image = torch.rot90(image, 1, (-2, -1))
        boxes = torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)
    return image, boxes


def photometric(image: torch.Tensor, brightness: float, contrast: float, saturation: float,
                hue: float) -> torch.Tensor:
    """Brightness, contrast and saturation scaled by their factors and the hue turned by `hue`
    (torchvision's definitions), skipping those that are identities (hue is the costly one)."""
    if brightness != 1:
        image = F.adjust_brightness(image, brightness)
    if contrast != 1:
        image = F.adjust_contrast(image, contrast)
    if saturation != 1:
        image = F.adjust_saturation(image, saturation)
    if hue != 0:
        image = F.adjust_hue(image, hue)
    return image


def rescale(image: torch.Tensor, target: dict, scale: float, fx: float, fy: float, min_visible: float,
            fill: tuple[int, ...]) -> tuple[torch.Tensor, dict]:
    """The image resized by `scale` and brought back to its own size: above 1 by cropping a window
    of `1/scale` of its sides at `(fx, fy)` of the free range (see `zoom_crop`) and enlarging it,
    below 1 by shrinking it onto a canvas of `fill` at `(fx, fy)`. Boxes follow exactly (by the
    whole-pixel sizes actually used); boxes that shrink to 1 px or less are dropped."""
    height, width = image.shape[-2:]
    if scale >= 1:
        crop, target = zoom_crop(image, target, scale, fx, fy, min_visible)
        if crop.shape[-2:] == image.shape[-2:]:
            return crop, target
        factors = torch.tensor([width / crop.shape[-1], height / crop.shape[-2]] * 2)
        return F.resize(crop, [height, width], antialias=True), {**target, "boxes": target["boxes"] * factors}
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    x0, y0 = round(fx * (width - new_w)), round(fy * (height - new_h))
    canvas = torch.tensor(fill, dtype=image.dtype).reshape(-1, 1, 1).expand_as(image).clone()
    canvas[:, y0 : y0 + new_h, x0 : x0 + new_w] = F.resize(image, [new_h, new_w], antialias=True)
    boxes = target["boxes"] * torch.tensor([new_w / width, new_h / height] * 2) + torch.tensor([x0, y0] * 2)
    keep = ((boxes[:, 2:] - boxes[:, :2]) > 1).all(dim=1)
    return canvas, {**target, "boxes": boxes[keep], "labels": target["labels"][keep],
                    "iscrowd": target["iscrowd"][keep]}


def crop_boxes(boxes: torch.Tensor, window: tuple[int, int, int, int], min_visible: float):
    """Boxes `(N, 4)` seen through `window`, in window pixels: `(boxes, kept, partial)` where
    `kept` marks boxes with at least `min_visible` of their area inside (trained as usual) and
    `partial` those cut more than that (kept as ignored regions, so that detecting a part
    is not punished)."""
    x0, y0, x1, y1 = window
    clipped = torch.stack([boxes[:, 0].clamp(x0, x1), boxes[:, 1].clamp(y0, y1),
                           boxes[:, 2].clamp(x0, x1), boxes[:, 3].clamp(y0, y1)], dim=1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1).clamp(min=1e-9)
    visible_wh = clipped[:, 2:] - clipped[:, :2]
    visible = visible_wh.prod(dim=1) / area
    inside = (visible_wh > 1).all(dim=1)
    shifted = clipped - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    kept = inside & (visible >= min_visible)
    return shifted, kept, inside & ~kept


def zoom_crop(image: torch.Tensor, target: dict, zoom: float, fx: float, fy: float,
              min_visible: float = 0.5) -> tuple[torch.Tensor, dict]:
    """Crop `image (C, H, W)` to a window of `1/zoom` of its width and height whose top-left
    corner is at `(fx, fy)` of the free range; the model resizes it back, so that objects
    appear `zoom` times larger. Boxes with at least `min_visible` of their area inside are kept,
    those cut more become ignored regions (`iscrowd`), those outside are dropped."""
    height, width = image.shape[-2:]
    crop_w, crop_h = max(1, round(width / zoom)), max(1, round(height / zoom))
    x0, y0 = round(fx * (width - crop_w)), round(fy * (height - crop_h))
    shifted, kept, partial = crop_boxes(target["boxes"], (x0, y0, x0 + crop_w, y0 + crop_h), min_visible)
    use = kept | partial
    target = {**target, "boxes": shifted[use], "labels": target["labels"][use],
              "iscrowd": (target["iscrowd"] | partial)[use]}
    return image[:, y0 : y0 + crop_h, x0 : x0 + crop_w], target


def rotated_aspect_ratio(ratio: float, drawn: tuple) -> float:
    """Width / height of an item of aspect `ratio` after the ops as drawn (quarter turns swap them)."""
    turns = sum(params[1] for params in drawn if params is not None and params[0] == "rotate90")
    return 1 / ratio if turns % 2 else ratio

