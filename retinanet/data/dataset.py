"""The dataset interface every annotation format is read into: image records with boxes in
pixels, contiguous labels, and the categories they stand for. Knows no model."""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .augment import apply_ops, crop_boxes, hflip, zoom_crop  # noqa: F401 (also imported from here)
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
    missing_images: list[str] = field(default_factory=list)  # formats that read sizes from the files


class DetectionDataset(Dataset):
    """Images and boxes, whatever the annotation format they were read from.

    Labels are contiguous `0..K-1`; `category_ids[label]` and `class_names[label]` say what
    they stand for. Crowd (or VOC `difficult`) boxes are kept (`iscrowd`) for the matcher to
    ignore. Images without boxes stay, as background. An item is `(image uint8 (3, H, W),
    target)`; an unreadable image gives its `ImageReadError` instead (which `collate` sets
    aside), unless `strict`, where it raises. Items may be indexed by `i` or by what
    `TrainBatchSampler` draws (`(i, flip, ...)`, see `sampled_item`): the sampler decides the
    augmentation so that it is reproducible regardless of worker processes.
    """

    format = "coco"

    def __init__(self, image_dir: str | Path, source: str | Path, records: list[ImageRecord],
                 category_ids: list[int], class_names: list[str], report: DatasetReport, strict: bool = False):
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(source)  # the file or folder the annotations came from
        self.records, self.report, self.strict = records, report, strict
        self.category_ids, self.class_names = list(category_ids), list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the annotation file (no decoding)."""
        return [r.width / r.height for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item):
        index, flip, zoom, ops = sampled_item(item)
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
        return augment(image, target, flip, zoom, ops)

    def coco_dict(self) -> dict:
        """The dataset as a COCO annotation dict (boxes as read, after clipping)."""
        images, annotations = [], []
        for r in self.records:
            images.append({"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height})
            for (x0, y0, x1, y1), label, crowd in zip(r.boxes, r.labels, r.crowd):
                annotations.append({"id": len(annotations) + 1, "image_id": r.image_id,
                                    "category_id": self.category_ids[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": int(crowd)})
        categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def coco_ground_truth(self):
        """pycocotools' `COCO` of this dataset, for evaluation."""
        return coco_api(self.coco_dict())


def coco_api(data: dict):
    """pycocotools' `COCO` for an annotation dict, with the `iscrowd`/`area` fields it needs."""
    from pycocotools.coco import COCO

    for ann in data.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def raise_problems(source, problems: list[str]) -> None:
    """One `DatasetError` for all the problems of a file: the first three in its message, all
    of them in `.problems` (for `check-data`)."""
    if problems:
        more = f" (and {len(problems) - 3} more problems; retinanet check-data lists them all)" \
            if len(problems) > 3 else ""
        raise DatasetError(f"{source}: " + "; ".join(problems[:3]) + more, [f"{source}: {p}" for p in problems])


def finish_report(records: list[ImageRecord], report: DatasetReport, source) -> DatasetReport:
    report.num_images = len(records)
    report.num_boxes = sum(len(r.boxes) for r in records)
    report.num_crowd = sum(sum(r.crowd) for r in records)
    report.images_without_boxes = sum(not r.boxes for r in records)
    if report.dropped_boxes:
        log.warning("%s: dropped %d degenerate boxes (w or h <= 1 px, or outside the image), e.g. %s",
                    source, report.dropped_boxes, "; ".join(report.dropped_examples[:3]))
    return report


def add_box(record: ImageRecord, report: DatasetReport, xyxy, label: int, crowd: bool, where: str) -> None:
    """Append a box `[x0, y0, x1, y1]` clipped to the image, or count it as dropped."""
    box = valid_xyxy(xyxy, record.width, record.height)
    if box is None:
        report.dropped_boxes += 1
        if len(report.dropped_examples) < 5:
            report.dropped_examples.append(f"{where} box={list(xyxy) if isinstance(xyxy, (list, tuple)) else xyxy!r}")
        return
    record.boxes.append(box)
    record.labels.append(label)
    record.crowd.append(crowd)


def valid_xyxy(box, width: int, height: int) -> list[float] | None:
    """`[x0, y0, x1, y1]` clipped to the image, or None if degenerate (<= 1 px) or not numbers."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return None
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 <= 1 or y1 - y0 <= 1:
        return None
    return [x0, y0, x1, y1]


def sampled_item(item) -> tuple[int, bool, tuple[float, float, float] | None, tuple]:
    """`(index, flip, zoom, ops)` from a dataset item: an index, `(index, flip)`,
    `(index, flip, (zoom, fx, fy))` or `(index, flip, zoom or None, ops)` as `TrainBatchSampler`
    draws them (`ops`: the drawn `data.augment`, see `augment.draw_ops`)."""
    if not isinstance(item, tuple):
        return item, False, None, ()
    return item[0], item[1], item[2] if len(item) > 2 else None, item[3] if len(item) > 3 else ()


def augment(image: torch.Tensor, target: dict, flip: bool, zoom: tuple[float, float, float] | None,
            ops: tuple = ()) -> tuple[torch.Tensor, dict]:
    """An item's training augmentation as the sampler drew it: the zoom crop, the flip, then
    `data.augment`'s ops in order."""
    if zoom is not None:
        image, target = zoom_crop(image, target, *zoom)
    if flip:
        image, target["boxes"] = hflip(image, target["boxes"])
    return apply_ops(image, target, ops)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
    return torch.minimum(boxes.clamp(min=0), limit)


def collate(batch: list) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """`(images, targets, skipped)`: unreadable images are left out and listed in `skipped`."""
    good = [item for item in batch if not isinstance(item, ImageReadError)]
    skipped = [str(item) for item in batch if isinstance(item, ImageReadError)]
    return [item[0] for item in good], [item[1] for item in good], skipped
