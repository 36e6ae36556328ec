"""A COCO-format detection dataset: an image folder and an annotation json."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .image_io import ImageReadError, read_image

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the file and the problem(s).
    `problems` lists every problem found, one line each."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: list[list[float]]  # xyxy pixels
    labels: list[int]  # contiguous
    crowd: list[bool]


@dataclass
class DatasetReport:
    """What loading the annotation file found and did, for `check-data` and warnings."""

    num_images: int = 0
    num_boxes: int = 0
    num_crowd: int = 0
    images_without_boxes: int = 0
    dropped_boxes: int = 0
    dropped_examples: list[str] = field(default_factory=list)


class CocoDetection(Dataset):
    """Images and boxes from a COCO json.

    Category ids map to contiguous labels `0..K-1` in id order (`category_ids[label]` maps
    back). Crowd boxes are kept (`iscrowd`) for the matcher to ignore. Degenerate boxes
    (width or height <= 1 px after clipping to the image, or outside it) are dropped with
    one summary warning. Images without boxes stay, as background. An item is
    `(image uint8 (3, H, W), target)`; an unreadable image gives its `ImageReadError`
    instead (which `collate` sets aside), unless `strict`, where it raises.

    Items may be indexed by `i` or by `(i, flip)`: the sampler decides flips so that they
    are reproducible regardless of worker processes.
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, strict: bool = False):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.strict = strict
        data = load_coco_json(self.annotation_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.category_to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.records, self.report = self._parse(data)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found (for {self.annotation_file})")

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the annotation file (no decoding)."""
        return [r.width / r.height for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        record = self.records[index]
        path = self.image_dir / record.file_name
        try:
            image = read_image(path)
        except ImageReadError as err:
            if self.strict:
                raise
            log.warning("skipping %s", err)
            return err
        boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        h, w = image.shape[-2:]
        if (h, w) != (record.height, record.width) and len(boxes):
            boxes = clip_boxes(boxes * torch.tensor([w / record.width, h / record.height] * 2), h, w)
        target = {
            "boxes": boxes,
            "labels": torch.tensor(record.labels, dtype=torch.long),
            "iscrowd": torch.tensor(record.crowd, dtype=torch.bool),
            "image_id": record.image_id,
        }
        if flip:
            image, target["boxes"] = hflip(image, target["boxes"])
        return image, target

    def _parse(self, data: dict) -> tuple[list[ImageRecord], DatasetReport]:
        """Records of every image; all problems of the file are collected and raised together."""
        source = self.annotation_file
        report = DatasetReport()
        records: dict = {}
        problems: list[str] = []
        for i, image in enumerate(data["images"]):
            record = _image_record(image, i, records, problems)
            if record is not None:
                records[record.image_id] = record
        for j, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
                problems.append(f"annotations[{j}] needs image_id, category_id and bbox")
                continue
            record = records.get(ann["image_id"]) if isinstance(ann["image_id"], (int, str)) else None
            if record is None:
                problems.append(f"annotation {ann.get('id', j)} refers to unknown image id {ann['image_id']!r}")
                continue
            label = self.category_to_label.get(ann["category_id"]) if _hashable(ann["category_id"]) else None
            if label is None:
                problems.append(f"annotation {ann.get('id', j)} has category id {ann['category_id']!r}, which is "
                                f"not among the file's categories {self.category_ids[:10]}")
                continue
            box = _valid_box(ann.get("bbox"), record.width, record.height)
            if box is None:
                report.dropped_boxes += 1
                if len(report.dropped_examples) < 5:
                    report.dropped_examples.append(f"annotation {ann.get('id', j)} bbox={ann.get('bbox')!r}")
                continue
            record.boxes.append(box)
            record.labels.append(label)
            record.crowd.append(bool(ann.get("iscrowd", 0)))
        if problems:
            more = f" (and {len(problems) - 3} more problems; retinanet check-data lists them all)" \
                if len(problems) > 3 else ""
            raise DatasetError(f"{source}: " + "; ".join(problems[:3]) + more,
                               [f"{source}: {p}" for p in problems])
        report.num_images = len(records)
        report.num_boxes = sum(len(r.boxes) for r in records.values())
        report.num_crowd = sum(sum(r.crowd) for r in records.values())
        report.images_without_boxes = sum(not r.boxes for r in records.values())
        if report.dropped_boxes:
            log.warning("%s: dropped %d degenerate boxes (w or h <= 1 px, or outside the image), e.g. %s",
                        source, report.dropped_boxes, "; ".join(report.dropped_examples[:3]))
        return list(records.values()), report


def _hashable(value) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _image_record(image, i: int, records: dict, problems: list[str]) -> ImageRecord | None:
    """The record of `images[i]`, or None with the problem appended."""
    try:
        image_id, file_name = image["id"], image["file_name"]
        width, height = int(image["width"]), int(image["height"])
    except (KeyError, TypeError, ValueError, OverflowError):
        problems.append(f"images[{i}] needs id, file_name, width and height")
        return None
    if not _hashable(image_id):
        problems.append(f"images[{i}] has id {image_id!r}; ids must be integers or strings")
    elif width <= 0 or height <= 0:
        problems.append(f"image {image_id} ({file_name}) has size {width}x{height}")
    elif image_id in records:
        problems.append(f"image id {image_id} appears twice")
    else:
        return ImageRecord(image_id, file_name, width, height, [], [], [])
    return None


def load_coco_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: not a COCO annotation file (no '{key}' list)")
    if not data["categories"]:
        raise DatasetError(f"{path}: no categories")
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DatasetError(f"{path}: every category needs an integer id, got {c!r}")
    return data


def _valid_box(bbox, width: int, height: int) -> list[float] | None:
    """COCO `[x, y, w, h]` as xyxy clipped to the image, or None if degenerate."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 1 or y1 - y0 <= 1:
        return None
    return [x0, y0, x1, y1]


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limit)


def hflip(image: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image `(C, H, W)` and its xyxy boxes left-right."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """`(images, targets, skipped)`: unreadable images are left out and listed in `skipped`."""
    good = [item for item in batch if not isinstance(item, ImageReadError)]
    skipped = [str(item) for item in batch if isinstance(item, ImageReadError)]
    return [item[0] for item in good], [item[1] for item in good], skipped
