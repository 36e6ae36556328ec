"""Prediction over image files for every backend, without torch (the onnxruntime backend
imports none): the image files that inputs name, one loop that decodes them, runs a backend
on batches and writes predictions.json, the drawings and the label files.

A backend is any object with `class_names`, `category_ids`, `check_size(height, width,
name)` (raises `ValueError` naming `name` for an image it cannot take) and
`predict(images, score_threshold=None)`: `(H, W, 3)` uint8 RGB arrays in, per image
`{"boxes" (D, 4) xyxy in the image's pixels, "scores" (D,), "labels" (D,), "class_names"}`
out (numpy arrays or tensors), best first.

A run can be shared by many processes (`Shard`: e.g. `torchrun --nproc-per-node N -m
retinanet.cli predict ...`): each takes every N-th image and appends one line per image done
to its part, `parts/rankRRRRR-of-NNNNN.jsonl`, flushed to disk after every batch; the first
process then merges the parts into predictions.json. A run stopped at any moment has lost
at most a batch: `resume` skips the images that some part holds.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

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


PARTS = "parts"  # the folder of the per-process parts, in the output folder


class TiledRun(Protocol):
    """Prediction that goes unit by unit inside each image, shared by processes below the
    image (`engine.tiled_files.TiledFiles`), block by block of images: `start` once, then per
    block `predict_units` (this process's share of the units of the block's images), a barrier,
    `gather` (the new units of the images this process finishes) and `finish` for each of them
    (merge and write one image; its records and how many of its tiles reached the detection
    cap)."""

    def start(self, paths: list[Path], shard: "Shard", output_dir: Path, resume: bool) -> None: ...

    def predict_units(self, paths: list[Path], first: int) -> None: ...

    def gather(self) -> None: ...

    def finish(self, path: Path, drawing: Path, label_dir: Path) -> tuple[list[dict], int]: ...


TILED_BLOCK = 4  # images per process in a block of tiled prediction: the units memory holds at once


@dataclass(frozen=True)
class Shard:
    """This process's share of a prediction run over `world_size` processes: the images
    `rank`, `rank + world_size`, ... of the input list. `barrier()` returns once every
    process has called it (required when `world_size > 1`)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, output_dir: Path) -> Path:
        return output_dir / PARTS / f"rank{self.rank:05d}-of-{self.world_size:05d}.jsonl"


def predict_files(backend, inputs: list[str | Path], output_dir: str | Path, score_threshold: float | None = None,
                  draw: bool = True, batch_size: int = 4, workers: int = 2, save_txt: str | None = None,
                  progress: bool = True, tiled: TiledRun | None = None, shard: Shard | None = None,
                  resume: bool = False) -> tuple[list[dict], list[str]]:
    """Detect in every readable image with `backend`; bad inputs are reported (one line each on
    stderr) and skipped. Returns the predictions and the error lines: all of them on the main
    process (`shard.rank` 0), this process's own on the others.

    Images are decoded by `workers` threads (0: in this thread), a few batches ahead, and run
    in batches of `batch_size`. Writes `output_dir/predictions.json` (`file_name`,
    `category_id`, `category_name`, `bbox` [x, y, w, h], `score`), in the order of the inputs
    however many processes shared the run; with `draw`, a drawn copy of each image (never over
    an input); with `save_txt` ("yolo" or "csv"), one file per image in `output_dir/labels/`:
    YOLO's normalised `class cx cy w h score` lines, or `x1,y1,x2,y2,score,class_name` rows.
    `tiled`, when given, replaces the batched loop (tiled prediction, shared by the processes
    tile by tile, see `TiledRun`). `shard`: this process's share
    of the images (None: all); each process's part in `output_dir/parts/` gets a line per image
    done, on disk after every batch. `resume`: skip the images that the parts there hold
    (written by a run stopped part way, with any number of processes) and share out the rest
    anew. Every other file is
    written atomically (per-image files without an fsync each) and replaces (never follows) a
    symlink at its name; an output folder that cannot be written is refused before any work
    (`OutputNotWritten`)."""
    shard = shard or Shard()
    if shard.world_size > 1 and shard.barrier is None:
        raise ValueError("a prediction shared by several processes needs their barrier")
    output_dir = check_writable(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths, errors = collect_images(inputs)
    if shard.is_main:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
    names = drawn_names(paths, output_dir)
    label_dir = output_dir / "labels"
    todo = paths
    if resume:
        done = read_parts(output_dir / PARTS)
        todo = [p for p in paths if str(p) not in done]
        if shard.barrier is not None:
            shard.barrier()  # every process has read the same parts before any adds to them
    mine = todo[shard.rank :: shard.world_size]  # the rest shared out again, however it was shared before
    part = _Part(output_dir, shard, resume)
    bar = progress_bar(len(mine), progress and shard.is_main)
    predictions: list[dict] = []
    own_errors: list[str] = []
    try:
        if tiled is not None:
            tiled.start(todo, shard, output_dir, resume)
            block = TILED_BLOCK * shard.world_size
            for first in range(0, len(todo), block):
                tiled.predict_units(todo[first : first + block], first)
                if shard.barrier is not None:
                    shard.barrier()  # every unit of the block is on disk
                tiled.gather()
                for path in todo[first + shard.rank : first + block : shard.world_size]:  # this process's, as `mine`
                    try:
                        records, at_cap = tiled.finish(path, names[path], label_dir)
                        predictions += records
                        part.add(path, records, tiles_at_cap=at_cap)
                    except (ImageReadError, ValueError) as err:
                        _report(str(err), own_errors)
                        part.add(path, error=str(err))
                    part.flush()
                    if bar is not None:
                        bar.update(1)
        else:
            for items in _batches(_decoded(mine, backend.check_size, workers, 2 * batch_size), batch_size):
                good = [(path, item) for path, item in items if not isinstance(item, str)]
                for path, item in items:
                    if isinstance(item, str):
                        _report(item, own_errors)
                        part.add(path, error=item)
                if good:
                    for (path, _), records in zip(good, _run(backend, good, names, draw, score_threshold, save_txt,
                                                              label_dir)):
                        predictions += records
                        part.add(path, records)
                part.flush()
                if bar is not None:
                    bar.update(len(items))
    finally:
        part.close()
        if bar is not None:
            bar.close()
    if shard.barrier is not None:
        shard.barrier()
    if not shard.is_main:
        return predictions, own_errors
    entries = read_parts(output_dir / PARTS)
    predictions, errors = merge_parts(output_dir, entries, paths, errors)
    how = getattr(backend, "raise_cap", "model.inference.detections_per_image")
    if tiled is None:
        note = cap_note(images_at_cap(predictions, "file_name", detection_cap(backend)), detection_cap(backend), how)
    else:  # a tiled image merges many tiles' detections: the cap is per tile
        at_cap = sum(entries.get(str(p), {}).get("tiles_at_cap", 0) for p in paths)
        note = cap_note(at_cap, detection_cap(backend), how, unit="tile")
    if note:
        print(note, file=sys.stderr)
    return predictions, errors


def detection_cap(backend) -> int | None:
    """The most detections `backend` gives an image (`model.inference.detections_per_image`,
    which an exported graph holds from its export): a RetinaNet's, a backend's
    `detections_per_image`; None where unknown."""
    post = getattr(backend, "postprocessor", None)
    return getattr(post, "detections_per_image", None) or getattr(backend, "detections_per_image", None)


def images_at_cap(records: list[dict], key: str, cap: int | None) -> int:
    """How many images (told apart by `key`, e.g. `file_name` or `image_id`) have `cap`
    records or more: images whose lower-scored detections the cap dropped."""
    if cap is None:
        return 0
    counts: dict = {}
    for record in records:
        counts[record[key]] = counts.get(record[key], 0) + 1
    return sum(count >= cap for count in counts.values())


def cap_note(count: int, cap: int | None, how: str, unit: str = "image") -> str | None:
    """The line a run prints once when `count` images (or tiles, `unit`) reached the cap of
    `cap` detections (None when none did); `how` says how to raise it."""
    if not count or cap is None:
        return None
    return (f"note: {count} {unit}(s) reached the cap of {cap} detections per {unit}, which dropped their "
            f"lower-scored detections; raise it with {how}")


def merge_parts(output_dir: Path, entries: dict[str, dict], paths: list[Path],
                errors: list[str]) -> tuple[list[dict], list[str]]:
    """Write `output_dir/predictions.json` from the parts' `entries` (`read_parts`) of `paths`,
    in their order; returns the predictions and `errors` followed by the entries' error lines."""
    predictions: list[dict] = []
    errors = list(errors)
    for path in paths:
        entry = entries.get(str(path), {})
        predictions += entry.get("records", [])
        if "error" in entry:
            errors.append(entry["error"])
    write_text(output_dir / "predictions.json", json.dumps(predictions, indent=1))
    return predictions, errors


def read_parts(folder: Path) -> dict[str, dict]:
    """The entries (`file_name`, and `records` or `error`) of the parts in `folder`, by file
    name (the first one of a name counts); a line torn by a stopped process is left out, as
    are symlinks, which are never followed."""
    entries: dict[str, dict] = {}
    if not folder.is_dir() or folder.is_symlink():
        return entries
    for part in sorted(folder.glob("rank*-of-*.jsonl")):
        if part.is_symlink() or not part.is_file():
            continue
        for line in part.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
                entries.setdefault(entry["file_name"], entry)
    return entries


class _Part:
    """This process's part: one JSON line per image done, appended and put on disk (fsync) per
    batch. A new run starts it empty (the first process also removes the parts that other
    numbers of processes left); a resumed one keeps its complete lines."""

    def __init__(self, output_dir: Path, shard: Shard, resume: bool):
        folder = output_dir / PARTS
        if folder.is_symlink():
            folder.unlink()
        folder.mkdir(exist_ok=True)
        self.path = shard.part(output_dir)
        if not resume and shard.is_main:
            for old in folder.glob("rank*-of-*.jsonl"):
                if not old.name.endswith(f"-of-{shard.world_size:05d}.jsonl"):
                    old.unlink()
        if resume and self.path.is_file() and not self.path.is_symlink():
            _drop_torn_line(self.path)
        else:
            write_text(self.path, "")  # replaces a symlink or an earlier run's part
        self.file = open(self.path, "a", encoding="utf-8")
        self.lines: list[str] = []

    def add(self, path: Path, records: list[dict] | None = None, error: str | None = None, **counts: int) -> None:
        entry = {"file_name": str(path), **({"error": error} if error is not None else {"records": records}), **counts}
        self.lines.append(json.dumps(entry) + "\n")

    def flush(self) -> None:
        if self.lines:
            self.file.write("".join(self.lines))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.lines = []

    def close(self) -> None:
        self.file.close()


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a process stopped while writing it)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)


def predict_exported(backend: str, weights: str | Path, inputs: list[str | Path], output_dir: Path, *,
                     score_threshold: float | None = None, max_detections: int | None = None, draw: bool = True,
                     batch_size: int = 4, workers: int = 2, save_txt: str | None = None,
                     resume: bool = False) -> tuple[list[dict], list[str]]:
    """`retinanet predict` with an exported model under its runtime (`export.runtimes`; no
    torch is imported). A score threshold below the graph's, or a detection cap other than the
    one the graph holds, is refused (`ExportedModelError`): the graph cannot give them."""
    from ..export.runtimes import ExportedModelError, open_exported

    detector = open_exported(backend, weights)
    if score_threshold is not None and score_threshold < detector.score_threshold:
        raise ExportedModelError(f"--score-threshold {score_threshold:g}: {weights} was exported with "
                                 f"{detector.score_threshold:g} and gives no detections below it; predict with the "
                                 "checkpoint for a lower one")
    if max_detections and max_detections != detector.detections_per_image:
        raise ExportedModelError(f"--max-detections {max_detections}: {weights} holds its cap of "
                                 f"{detector.detections_per_image or 'an unknown number of'} detections per image in "
                                 f"the graph; export it again with --max-detections {max_detections}")
    return predict_files(detector, inputs, output_dir, score_threshold, draw=draw, batch_size=batch_size,
                         workers=workers, save_txt=save_txt, resume=resume)


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
         save_txt: str | None, label_dir: Path) -> list[list[dict]]:
    """Detect in `items` (`(path, image)`), write the drawings (to `names[path]`) and label
    files asked for, and return each image's COCO-style records."""
    outputs = backend.predict([image for _, image in items], score_threshold=score_threshold)
    records = []
    for (path, image), det in zip(items, outputs):
        records.append(coco_records(det, path, backend.category_ids))
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
