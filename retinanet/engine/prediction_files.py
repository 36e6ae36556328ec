"""What prediction reads and writes that needs no torch, shared by every backend (the
onnxruntime one imports no torch): the image files that inputs name, and the records of
predictions.json."""

from __future__ import annotations

import glob
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def collect_images(inputs: list[str | Path]) -> tuple[list[Path], list[str]]:
    """Files as given, folders searched recursively for images, glob patterns expanded.
    Returns the image paths (in order, without repeats) and one error line per bad input."""
    paths, errors, seen = [], [], set()
    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                errors.append(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif path.exists() or not glob.has_magic(item):
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                errors.append(f"{item}: no file matches this pattern")
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(p)
    return paths, errors


def coco_records(det: dict, path: Path, category_ids: list[int]) -> list[dict]:
    """One image's detections (`boxes` xyxy, `scores`, `labels` as tensors or arrays, and
    `class_names`) as predictions.json records (`bbox` is x, y, w, h)."""
    records = []
    for (x0, y0, x1, y1), score, label, name in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                    det["labels"].tolist(), det["class_names"]):
        records.append({"file_name": str(path), "category_id": category_ids[label], "category_name": name,
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(score, 5)})
    return records
