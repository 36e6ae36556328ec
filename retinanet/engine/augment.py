"""`retinanet augment`: training images as the model sees them after `data.augment` (and
`data.horizontal_flip`, `data.max_zoom`, tiles), with their boxes, drawn into a folder."""

from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path

from ..config import Config
from ..data.image_io import ImageReadError
from ..data.sampler import TrainBatchSampler
from ..outputs import OutputRefused, check_output_file, check_writable, save_image, write_text
from .analyze import _open
from ..analysis.drawing import draw_detections

log = logging.getLogger(__name__)


def draw_augmented(cfg: Config, output_dir: str | Path, count: int = 16, split: str = "train", force: bool = False,
                   inputs: tuple[str | Path, ...] = ()) -> list[Path]:
    """Draw `count` items of `split` augmented as training's first epoch draws them (the same
    sampler and seed) into `output_dir`: `augmented_NNN.png` with the trained boxes in class
    colours and the ignored regions outlined in white, and `augment.json` listing each
    picture's source and draws. Every file is written atomically. Refused (`OutputRefused`):
    an existing non-empty folder without `force`, a folder inside the dataset's image folder,
    a picture onto one of `inputs` or the annotation file; an unwritable folder, before any image
    is read.
    Unreadable images are skipped with a warning. Returns the pictures' paths."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputRefused(f"{output_dir}: is a file; --output takes a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise OutputRefused(f"{output_dir}: exists and is not empty; pass --force to write into it")
    dataset = _open(cfg, split)
    protected = [dataset.annotation_file, *inputs]
    names = [output_dir / f"augmented_{i:03d}.png" for i in range(count)] + [output_dir / "augment.json"]
    for name in names:
        check_output_file(name, protected, force=True, input_folders=[dataset.image_dir])
    check_writable(output_dir)
    d = cfg.data
    sampler = TrainBatchSampler(dataset.aspect_ratios(), 1, cfg.train.seed, grouping=False,
                                flip_prob=d.horizontal_flip, max_zoom=d.max_zoom, augment=d.augment)
    written, listing = [], []
    for (item,) in islice(iter(sampler), count + len(dataset)):  # each unreadable image costs one try
        if len(written) == count:
            break
        result = dataset[item]
        if isinstance(result, ImageReadError):
            log.warning("skipping %s", result)
            continue
        image, target = result
        path = names[len(written)]
        save_image(_picture(image, target, dataset.class_names), path)
        written.append(path)
        listing.append({"picture": path.name, "image": dataset.records[item[0]].file_name,
                        "size": list(image.shape[-2:]), "horizontal_flip": item[1],
                        "zoom": list(item[2]) if len(item) > 2 and item[2] is not None else None,
                        "augment": [list(op) if op is not None else None for op in item[3]] if len(item) > 3 else [],
                        "boxes": target["boxes"][~target["iscrowd"]].tolist(),
                        "ignored": target["boxes"][target["iscrowd"]].tolist()})
    write_text(names[-1], json.dumps(listing, indent=1))
    return written


def _picture(image, target: dict, class_names: list[str]):
    """The image enlarged to at least ~512 px, its trained boxes labelled by class and its
    ignored regions (`iscrowd`) outlined in white."""
    crowd = target["iscrowd"]
    labels = target["labels"][~crowd]
    det = {"boxes": target["boxes"][~crowd], "labels": labels, "class_names": [class_names[i] for i in labels.tolist()]}
    scale = max(1, 512 // max(image.shape[-2:]))
    return draw_detections(image, det, max_boxes=len(labels), scale=scale, ground_truth=target["boxes"][crowd])
