"""COCO-format annotations: an image folder and an annotation json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .dataset import (DatasetError, DatasetReport, DetectionDataset, ImageRecord, add_box, clip_boxes, coco_api,
                      collate, finish_report, hflip, raise_problems)

__all__ = ["CocoDetection", "DatasetError", "DatasetReport", "ImageRecord", "clip_boxes", "collate", "hflip",
           "load_coco_json"]


class CocoDetection(DetectionDataset):
    """Images and boxes from a COCO json. Category ids map to contiguous labels in id order.
    Degenerate boxes (width or height <= 1 px after clipping to the image, or outside it)
    are dropped with one summary warning; every other problem of the file is an error."""

    format = "coco"

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, strict: bool = False):
        annotation_file = Path(annotation_file)
        data = load_coco_json(annotation_file)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        category_ids = [c["id"] for c in categories]
        names = [str(c.get("name", c["id"])) for c in categories]
        records, report = self._parse(data, annotation_file, {cid: i for i, cid in enumerate(category_ids)})
        super().__init__(image_dir, annotation_file, records, category_ids, names, report, strict)
        if not self.image_dir.is_dir():
            raise DatasetError(f"{self.image_dir}: image folder not found (for {self.annotation_file})")

    def coco_ground_truth(self):
        """The annotation file itself (areas and crowd flags as written), for pycocotools."""
        return coco_api(json.loads(self.annotation_file.read_text()))

    @staticmethod
    def _parse(data: dict, source: Path, category_to_label: dict) -> tuple[list[ImageRecord], DatasetReport]:
        """Records of every image; all problems of the file are collected and raised together."""
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
            label = category_to_label.get(ann["category_id"]) if _hashable(ann["category_id"]) else None
            if label is None:
                problems.append(f"annotation {ann.get('id', j)} has category id {ann['category_id']!r}, which is "
                                f"not among the file's categories {sorted(category_to_label)[:10]}")
                continue
            bbox = ann.get("bbox")
            xyxy = _xywh_to_xyxy(bbox)
            if xyxy is None:
                report.dropped_boxes += 1
                if len(report.dropped_examples) < 5:
                    report.dropped_examples.append(f"annotation {ann.get('id', j)} bbox={bbox!r}")
                continue
            add_box(record, report, xyxy, label, bool(ann.get("iscrowd", 0)), f"annotation {ann.get('id', j)}")
        raise_problems(source, problems)
        return list(records.values()), finish_report(list(records.values()), report, source)


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


def _xywh_to_xyxy(bbox) -> list[float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    return [x, y, x + w, y + h]
