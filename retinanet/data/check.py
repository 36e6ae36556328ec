"""`retinanet check-data`: validate datasets up front and print a report."""

from __future__ import annotations

from .coco import CocoDetection, DatasetError
from .image_io import ImageReadError, read_image


def check_dataset(image_dir: str, annotation_file: str, num_classes: int | None = None,
                  decode: bool = False) -> tuple[bool, list[str]]:
    """Returns `(ok, report lines)`: every problem found, not only the first. Problems
    that stop training (no readable image, a malformed file) make `ok` False."""
    lines = [f"{annotation_file}:"]
    try:
        dataset = CocoDetection(image_dir, annotation_file)
    except DatasetError as err:
        return False, lines + [f"  ERROR {problem}" for problem in err.problems] + ["  FAILED"]
    r = dataset.report
    errors: list[str] = []
    lines.append(f"  {r.num_images} images, {r.num_boxes} boxes ({r.num_crowd} crowd), "
                 f"{dataset.num_classes} categories, {r.images_without_boxes} images without boxes")
    if r.num_images == 0:
        errors.append("the dataset has no images")
    if num_classes is not None and num_classes != dataset.num_classes:
        errors.append(f"model.num_classes={num_classes} but the file has {dataset.num_classes} categories")
    if r.dropped_boxes:
        lines.append(f"  warning: {r.dropped_boxes} degenerate boxes will be dropped, e.g. "
                     + "; ".join(r.dropped_examples[:3]))
    missing = [rec.file_name for rec in dataset.records if not (dataset.image_dir / rec.file_name).is_file()]
    if missing and len(missing) == len(dataset.records):
        errors.append(f"none of the {len(missing)} image files exists in {dataset.image_dir}, e.g. {missing[:3]}")
    elif missing:
        lines.append(f"  warning: {len(missing)} image files are missing (skipped in training), e.g. {missing[:3]}")
    if decode:
        bad, resized, readable = [], [], 0
        for rec in dataset.records:
            path = dataset.image_dir / rec.file_name
            if not path.is_file():
                continue
            try:
                image = read_image(path)
            except ImageReadError as err:
                bad.append(str(err))
                continue
            readable += 1
            if tuple(image.shape[-2:]) != (rec.height, rec.width):
                resized.append(f"{path}: {image.shape[-1]}x{image.shape[-2]} px, but the annotation file says "
                               f"{rec.width}x{rec.height} (its boxes are rescaled to the file)")
        if bad:
            lines.append(f"  warning: {len(bad)} images cannot be decoded (skipped in training):")
            lines.extend(f"    {b}" for b in bad[:20])
        if resized:
            lines.append(f"  warning: {len(resized)} images differ in size from the annotation file:")
            lines.extend(f"    {b}" for b in resized[:20])
        if dataset.records and readable == 0:
            errors.append("no image of the dataset can be read")
    lines.extend(f"  ERROR {e}" for e in errors)
    lines.append("  FAILED" if errors else "  OK")
    return not errors, lines


def check_datasets(data_cfg, num_classes: int | None = None, decode: bool = False) -> bool:
    """Check the training and validation sets of a `DataConfig`; False when any fails or
    when no dataset is configured at all."""
    pairs = [("data.train_annotations", data_cfg.train_images, data_cfg.train_annotations),
             ("data.val_annotations", data_cfg.val_images, data_cfg.val_annotations)]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        print("ERROR no dataset configured: set data.train_annotations / data.val_annotations "
              "(and the image folders data.train_images / data.val_images)")
        return False
    ok = True
    for _, images, annotation_file in pairs:
        good, lines = check_dataset(images, annotation_file, num_classes, decode)
        print("\n".join(lines))
        ok = ok and good
    return ok

