"""`retinanet check-data`: validate datasets up front and print a report."""

from __future__ import annotations

from .coco import CocoDetection, DatasetError
from .image_io import ImageReadError, read_image


def check_dataset(image_dir: str, annotation_file: str, num_classes: int | None = None,
                  decode: bool = False) -> tuple[bool, list[str]]:
    """Returns `(ok, report lines)`. Problems that stop training make `ok` False."""
    lines = [f"{annotation_file}:"]
    try:
        dataset = CocoDetection(image_dir, annotation_file)
    except DatasetError as err:
        return False, lines + [f"  ERROR {err}"]
    r = dataset.report
    ok = True
    lines.append(f"  {r.num_images} images, {r.num_boxes} boxes ({r.num_crowd} crowd), "
                 f"{dataset.num_classes} categories, {r.images_without_boxes} images without boxes")
    if r.num_images == 0:
        ok = False
        lines.append("  ERROR the dataset has no images")
    if num_classes is not None and num_classes != dataset.num_classes:
        ok = False
        lines.append(f"  ERROR model.num_classes={num_classes} but the file has {dataset.num_classes} categories")
    if r.dropped_boxes:
        lines.append(f"  warning: {r.dropped_boxes} degenerate boxes will be dropped, e.g. "
                     + "; ".join(r.dropped_examples[:3]))
    missing = [rec.file_name for rec in dataset.records if not (dataset.image_dir / rec.file_name).is_file()]
    if missing:
        lines.append(f"  warning: {len(missing)} image files are missing (skipped in training), e.g. {missing[:3]}")
    if decode:
        bad = []
        for rec in dataset.records:
            path = dataset.image_dir / rec.file_name
            if path.is_file():
                try:
                    read_image(path)
                except ImageReadError as err:
                    bad.append(str(err))
        if bad:
            lines.append(f"  warning: {len(bad)} images cannot be decoded (skipped in training):")
            lines.extend(f"    {b}" for b in bad[:20])
    lines.append("  OK" if ok else "  FAILED")
    return ok, lines


def check_datasets(data_cfg, num_classes: int | None = None, decode: bool = False) -> bool:
    ok = True
    pairs = [(data_cfg.train_images, data_cfg.train_annotations), (data_cfg.val_images, data_cfg.val_annotations)]
    for images, annotation_file in pairs:
        if not annotation_file:
            continue
        good, lines = check_dataset(images, annotation_file, num_classes, decode)
        print("\n".join(lines))
        ok = ok and good
    return ok
