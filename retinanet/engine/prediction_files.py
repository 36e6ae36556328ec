"""Prediction over image files for every backend, without torch (the onnxruntime backend
imports none): the image files that inputs name, one loop that decodes them, runs a backend
on batches and writes predictions.json, the drawings and the label files.

A backend is any object with `class_names`, `category_ids`, `check_size(height, width,
name)` (raises `ValueError` naming `name` for an image it cannot take) and
`predict(images, score_threshold=None)`: `(H, W, 3)` uint8 RGB arrays in, per image
`{"boxes" (D, 4) xyxy in the image's pixels, "scores" (D,), "labels" (D,), "class_names"}`
out (numpy arrays or tensors), best first.
"""

from __future__ import annotations

import glob
import json
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..analysis.drawing import draw_detections
from ..data.image_io import ImageReadError, read_rgb
from ..outputs import check_writable, save_image, write_text

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DRAWING_MAX_SIDE = 4096  # drawings of larger images are shrunk to this


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


def size_groups(images: list) -> list[list[int]]:
    """The indices of `images` (`(H, W, 3)` arrays) grouped by size, in order of first
    appearance: a backend runs each group as one batch, so that no image is padded to
    another's size and its detections never depend on the batch it came in."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


PerFile = Callable[[Path, Path, Path], list[dict]]


def predict_files(backend, inputs: list[str | Path], output_dir: str | Path, score_threshold: float | None = None,
                  draw: bool = True, batch_size: int = 4, workers: int = 2, save_txt: str | None = None,
                  progress: bool = True, per_file: PerFile | None = None) -> tuple[list[dict], list[str]]:
    """Detect in every readable image with `backend`; bad inputs are reported (one line each on
    stderr) and skipped. Returns the predictions and the error lines.

    Images are decoded by `workers` threads (0: in this thread), a few batches ahead, and run
    in batches of `batch_size`. Writes `output_dir/predictions.json` (`file_name`,
    `category_id`, `category_name`, `bbox` [x, y, w, h], `score`); with `draw`, a drawn copy of
    each image (never over an input); with `save_txt` ("yolo" or "csv"), one file per image in
    `output_dir/labels/`: YOLO's normalised `class cx cy w h score` lines, or
    `x1,y1,x2,y2,score,class_name` rows. `per_file(path, drawing_path, label_dir)`, when given,
    replaces the batched loop and handles one file (tiled prediction), returning its records.
    Every file is written atomically (per-image files without an fsync each) and replaces
    (never follows) a symlink at its name; an output folder that cannot be written is refused
    before any work (`OutputNotWritten`)."""
    output_dir = check_writable(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths, errors = collect_images(inputs)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    names = drawn_names(paths, output_dir)
    label_dir = output_dir / "labels"
    bar = progress_bar(len(paths), progress)
    predictions: list[dict] = []
    try:
        if per_file is not None:
            for path in paths:
                try:
                    predictions += per_file(path, names[path], label_dir)
                except (ImageReadError, ValueError) as err:
                    _report(str(err), errors)
                if bar is not None:
                    bar.update(1)
        else:
            for items in _batches(_decoded(paths, backend.check_size, workers, 2 * batch_size), batch_size):
                good = [(path, item) for path, item in items if not isinstance(item, str)]
                for _, item in items:
                    if isinstance(item, str):
                        _report(item, errors)
                if good:
                    predictions += _run(backend, good, names, draw, score_threshold, save_txt, label_dir)
                if bar is not None:
                    bar.update(len(items))
    finally:
        if bar is not None:
            bar.close()
    write_text(output_dir / "predictions.json", json.dumps(predictions, indent=1))
    return predictions, errors


def _report(line: str, errors: list[str]) -> None:
    errors.append(line)
    print(f"error: {line}", file=sys.stderr)


def _decoded(paths: list[Path], check_size, workers: int, ahead: int) -> Iterator[tuple[Path, object]]:
    """`(path, (H, W, 3) array)` per path, in order, or `(path, error line)` for a file that
    cannot be read or that `check_size` refuses; decoded by `workers` threads at most `ahead`
    images ahead of the consumer (memory stays bounded whatever the number of files)."""
    def decode(path: Path):
        try:
            array = read_rgb(path)
            if check_size is not None:
                check_size(*array.shape[:2], name=str(path))
            return path, array
        except (ImageReadError, ValueError) as err:
            return path, str(err)

    if workers <= 0:
        yield from map(decode, paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.submit(decode, path))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _batches(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run(backend, items: list[tuple[Path, np.ndarray]], names: dict[Path, Path], draw: bool, score_threshold,
         save_txt: str | None, label_dir: Path) -> list[dict]:
    """Detect in `items` (`(path, image)`), write the drawings (to `names[path]`) and label
    files asked for, and return the COCO-style records."""
    outputs = backend.predict([image for _, image in items], score_threshold=score_threshold)
    records = []
    for (path, image), det in zip(items, outputs):
        records += coco_records(det, path, backend.category_ids)
        if draw:
            save_image(draw_detections(image, det), names[path], sync=False, quality=92)
        if save_txt is not None:
            write_labels(det, image.shape[:2], label_path(label_dir, names[path], save_txt), save_txt)
    return records


def progress_bar(total: int, enabled: bool):
    """A progress bar of `total` images on a terminal, else None."""
    if not (enabled and total and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="image")


def drawn_names(paths: list[Path], output_dir: Path) -> dict[Path, Path]:
    """A distinct output file for each input's drawing, never one of the inputs themselves:
    `photo.jpg` -> `photo.jpg` in `output_dir`; same stems get `_2`, `_3`, ..."""
    inputs = {p.resolve() for p in paths}
    taken: set[Path] = set()
    out = {}
    for path in paths:
        n, candidate = 1, output_dir / f"{path.stem}.jpg"
        while candidate.resolve() in taken or candidate.resolve() in inputs:
            n += 1
            candidate = output_dir / f"{path.stem}_{n}.jpg"
        taken.add(candidate.resolve())
        out[path] = candidate
    return out


def label_path(label_dir: Path, drawn: Path, kind: str) -> Path:
    """The label file of an image in `label_dir`, named after its drawing: `.txt` (yolo) or `.csv`."""
    return label_dir / drawn.with_suffix(".txt" if kind == "yolo" else ".csv").name


def write_labels(det: dict, size: tuple[int, int], path: Path, kind: str) -> Path:
    """One image's detections as YOLO txt (`class cx cy w h score`, normalised) or CSV rows
    (`x1,y1,x2,y2,score,class_name`, pixels), written atomically: a symlink at `path` is
    replaced, never followed."""
    h, w = size
    lines = []
    for (x0, y0, x1, y1), score, label, name in zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                    det["labels"].tolist(), det["class_names"]):
        if kind == "yolo":
            lines.append(f"{label} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} "
                         f"{(y1 - y0) / h:.6f} {score:.5f}")
        else:
            lines.append(f"{x0:.2f},{y0:.2f},{x1:.2f},{y1:.2f},{score:.5f},{name}")
    return write_text(path, "".join(line + "\n" for line in lines), sync=False)  # one per image: no fsync each
