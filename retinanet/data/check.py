"""`retinanet check-data`: validate datasets up front and print a report."""

from __future__ import annotations

from .dataset import DatasetError
from .formats import has_split, open_dataset
from .image_io import ImageReadError, read_image


def check_dataset(data_cfg, split: str, num_classes: int | None = None, decode: bool = False,
                  class_names: list[str] | None = None) -> tuple[bool, list[str], list[str] | None]:
    """Returns `(ok, report lines, class names)`: every problem found, not only the first.
    Problems that stop training (no readable image, a malformed file) make `ok` False."""
    source = getattr(data_cfg, f"{split}_annotations") or getattr(data_cfg, f"{split}_images")
    lines = [f"{source} ({data_cfg.format}, {split}):"]
    try:
        dataset = open_dataset(data_cfg, split, class_names)
    except DatasetError as err:
        return False, lines + [f"  ERROR {problem}" for problem in err.problems] + ["  FAILED"], None
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
    missing += r.missing_images
    if missing and not dataset.records:
        errors.append(f"none of the {len(missing)} image files exists or can be read in {dataset.image_dir}, "
                      f"e.g. {missing[:3]}")
    elif missing and len(missing) == len(dataset.records):
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
    return not errors, lines, dataset.class_names


def check_datasets(data_cfg, num_classes: int | None = None, decode: bool = False) -> bool:
    """Check the training and validation sets of a `DataConfig`; False when any fails or
    when no dataset is configured at all."""
    splits = [split for split in ("train", "val") if has_split(data_cfg, split)]
    if not splits:
        print("ERROR no dataset configured: set data.train_annotations / data.val_annotations "
              "(and the image folders data.train_images / data.val_images)")
        return False
    ok, class_names = True, None
    for split in splits:
        good, lines, names = check_dataset(data_cfg, split, num_classes, decode, class_names)
        class_names = class_names or names
        print("\n".join(lines))
        ok = ok and good
    return ok
