"""Annotation formats besides COCO: CSV (keras-retinanet's and DeepForest's), Pascal VOC XML
and YOLO txt. Each reader fills the same `DetectionDataset`, so training, evaluation,
`check-data` and the diagnostics take any of them unchanged. Bad input gets what COCO input
gets: every problem of a file named with its line, degenerate boxes dropped with a summary.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from ..outputs import OutputNotWritten, same_file, write_text
from .coco import CocoDetection
from .dataset import (DatasetError, DatasetReport, DetectionDataset, ImageRecord, add_box, finish_report,
                      raise_problems)

log = logging.getLogger(__name__)

FORMATS = ("coco", "csv", "voc", "yolo")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_size(path: Path) -> tuple[int, int] | None:
    """`(width, height)` of an image file as `read_image` will return it (EXIF rotation
    applied), from its header only; None when the file cannot be opened."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError):
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _class_map(names_found: list[str], class_names: list[str] | None, source, problems: list[str]) -> list[str]:
    """The class list: the given one (unknown names are problems), else the names found, sorted."""
    if class_names:
        unknown = sorted(set(names_found) - set(class_names))
        if unknown:
            problems.append(f"unknown classes {unknown[:10]} (not in the class list {class_names[:10]})")
        return list(class_names)
    return sorted(set(names_found))


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a YOLO `data.yaml` (`names:` list or mapping), a `classes.txt` (one per
    line) or a keras-retinanet classes CSV (`name,id`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: class list not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            names = (yaml.safe_load(text) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as err:
            raise DatasetError(f"{path}: not a YOLO data.yaml with a 'names' entry ({err})") from None
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names)]
        if not isinstance(names, list) or not names:
            raise DatasetError(f"{path}: no 'names' list")
        return [str(n) for n in names]
    if path.suffix == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r]
        try:
            pairs = sorted((int(r[1]), r[0].strip()) for r in rows)
        except (IndexError, ValueError):
            raise DatasetError(f"{path}: a classes CSV has lines 'class_name,id'") from None
        return [name for _, name in pairs]
    return [line.strip() for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------ CSV
def read_csv(csv_file: str | Path, image_dir: str | Path | None = None, class_names: list[str] | None = None,
             strict: bool = False) -> DetectionDataset:
    """keras-retinanet's layout (no header; `path,x1,y1,x2,y2,class_name`; an image without
    objects is `path,,,,,`) or DeepForest's (header `image_path,xmin,ymin,xmax,ymax,label`; an
    empty image is a row of zeros), told apart by the first line. Paths are relative to
    `image_dir`, by default the CSV's folder; spellings of one path (`a.jpg`, `./a.jpg`) are
    one image. A CSV without data rows is a DatasetError."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise DatasetError(f"{csv_file}: annotation file not found")
    root = Path(image_dir) if image_dir else csv_file.parent
    try:
        rows = list(csv.reader(csv_file.read_text().splitlines()))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"{csv_file}: not a readable CSV ({err})") from None
    problems: list[str] = []
    entries = _csv_entries(rows, problems)
    if not entries and not problems:
        raise DatasetError(f"{csv_file}: no annotation rows (the CSV is empty or has only a header)")
    names = _class_map([e[3] for e in entries if e[3] is not None], class_names, csv_file, problems)
    label_of = {n: i for i, n in enumerate(names)}
    records: dict[str, ImageRecord] = {}
    report = DatasetReport()
    missing = []
    for number, path, box, name in entries:
        key = os.path.normpath(root.absolute() / path)  # `a.jpg`, `./a.jpg`, `<root>/a.jpg`: one image
        record = records.get(key)
        if record is None:
            size = image_size(root / path)
            if size is None:
                missing.append(path)
                continue
            record = records[key] = ImageRecord(len(records) + 1, str(Path(path)), size[0], size[1], [], [], [])
        if box is not None and name in label_of:
            add_box(record, report, box, label_of[name], False, f"line {number}")
    raise_problems(csv_file, problems)
    if missing:
        log.warning("%s: %d image files are missing or unreadable (left out), e.g. %s", csv_file,
                    len(set(missing)), sorted(set(missing))[:3])
    report.missing_images = sorted(set(missing))
    records_list = list(records.values())
    dataset = DetectionDataset(root, csv_file, records_list, list(range(1, len(names) + 1)), names,
                               finish_report(records_list, report, csv_file), strict)
    dataset.format = "csv"
    return dataset


def _csv_entries(rows: list[list[str]], problems: list[str]) -> list[tuple]:
    """`(line number, path, box or None, class name or None)` per data row; a row that cannot
    be read adds a line to `problems` instead."""
    header = [c.strip().lower() for c in rows[0]] if rows else []
    deepforest = header[:1] == ["image_path"]
    start = 1 if deepforest else 0
    entries = []
    for number, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 6:
            problems.append(f"line {number}: expected 6 fields (path,x1,y1,x2,y2,class), got {len(row)}")
            continue
        path, *coords, name = (c.strip() for c in row)
        empty = all(not c for c in coords + [name]) or (deepforest and all(c in ("0", "0.0") for c in coords))
        if empty:
            entries.append((number, path, None, None))
            continue
        try:
            box = [float(c) for c in coords]
        except ValueError:
            problems.append(f"line {number}: coordinates {coords} are not numbers")
            continue
        if not name:
            problems.append(f"line {number}: no class name")
            continue
        entries.append((number, path, box, name))
    return entries


# ------------------------------------------------------------------------------ Pascal VOC
def read_voc(annotation_dir: str | Path, image_dir: str | Path, class_names: list[str] | None = None,
             difficult: str = "ignore", strict: bool = False) -> DetectionDataset:
    """A folder of VOC XML files. Pixel indices are 1-based in VOC: `xmin` and `ymin` lose 1,
    as detectron2 reads them (`xmax`/`ymax` then are exclusive ends). `difficult` objects are
    kept as ignored regions (`difficult="ignore"`), trained as ordinary boxes ("train") or
    dropped ("drop"). Images are looked up in `image_dir` by the XML's `filename`."""
    annotation_dir, image_dir = Path(annotation_dir), Path(image_dir)
    if not annotation_dir.is_dir():
        raise DatasetError(f"{annotation_dir}: VOC annotation folder not found")
    files = sorted(annotation_dir.glob("*.xml"))
    if not files:
        raise DatasetError(f"{annotation_dir}: no .xml files")
    problems, parsed = [], []
    for path in files:
        try:
            root = ET.parse(path).getroot()
            file_name = root.findtext("filename", "").strip() or path.stem + ".jpg"
            width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        except ET.ParseError as err:
            problems.append(f"{path.name}: not valid XML ({err})")
            continue
        except (TypeError, ValueError):
            problems.append(f"{path.name}: needs size/width and size/height")
            continue
        objects = []
        for k, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            try:
                box = [float(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                problems.append(f"{path.name}: object {k} ({name}) has no numeric bndbox")
                continue
            box[0] -= 1.0
            box[1] -= 1.0
            objects.append((name, box, (obj.findtext("difficult") or "0").strip() == "1"))
        parsed.append((path, file_name, width, height, objects))
    names = _class_map([n for *_, objs in parsed for n, _, _ in objs], class_names, annotation_dir, problems)
    raise_problems(annotation_dir, problems)
    label_of = {n: i for i, n in enumerate(names)}
    report, records = DatasetReport(), []
    for image_id, (path, file_name, width, height, objects) in enumerate(parsed, 1):
        if width <= 0 or height <= 0:
            raise DatasetError(f"{path}: image size {width}x{height}")
        record = ImageRecord(image_id, file_name, width, height, [], [], [])
        for name, box, is_difficult in objects:
            if is_difficult and difficult == "drop":
                continue
            add_box(record, report, box, label_of[name], is_difficult and difficult == "ignore", path.name)
        records.append(record)
    dataset = DetectionDataset(image_dir, annotation_dir, records, list(range(1, len(names) + 1)), names,
                               finish_report(records, report, annotation_dir), strict)
    dataset.format = "voc"
    return dataset


# ------------------------------------------------------------------------------ YOLO
def read_yolo(image_dir: str | Path, label_dir: str | Path | None, class_names: list[str],
              strict: bool = False) -> DetectionDataset:
    """`images/` with a `labels/` twin (same relative path, `.txt`): one `class cx cy w h` line
    per object, normalised to [0, 1]. A missing or empty label file is an image without
    objects. `label_dir` defaults to the image folder with its `images` part replaced by
    `labels`, as the YOLO tools lay them out."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetError(f"{image_dir}: image folder not found")
    label_dir = Path(label_dir) if label_dir else _yolo_label_dir(image_dir)
    if not class_names:
        raise DatasetError(f"{label_dir}: YOLO labels need a class list: set data.classes to a data.yaml or "
                           "classes.txt")
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    problems, records, report = [], [], DatasetReport()
    for image_id, path in enumerate(images, 1):
        relative = path.relative_to(image_dir)
        size = image_size(path)
        if size is None:
            problems.append(f"{relative}: not a readable image")
            continue
        record = ImageRecord(image_id, str(relative), size[0], size[1], [], [], [])
        label_file = (label_dir / relative).with_suffix(".txt")
        lines = label_file.read_text().splitlines() if label_file.is_file() else []
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            where = f"{label_file.relative_to(label_dir)}:{number}"
            try:
                cls, box = int(fields[0]), _yolo_box(fields[1:], size)
            except ValueError:
                problems.append(f"{where}: expected 'class cx cy w h' or a segment 'class x1 y1 x2 y2 x3 y3 ...', "
                                f"got {line.strip()[:80]!r}")
                continue
            if not 0 <= cls < len(class_names):
                problems.append(f"{where}: class {cls} is not in the class list (0-{len(class_names) - 1})")
                continue
            add_box(record, report, box, cls, False, where)
        records.append(record)
    raise_problems(label_dir, problems)
    dataset = DetectionDataset(image_dir, label_dir, records, list(range(1, len(class_names) + 1)),
                               list(class_names), finish_report(records, report, label_dir), strict)
    dataset.format = "yolo"
    return dataset


def _yolo_box(values: list[str], size: tuple[int, int]) -> list[float]:
    """The pixel box of a YOLO line's numbers (after the class): `cx cy w h`, or a segment's
    polygon `x1 y1 x2 y2 x3 y3 ...` (YOLO's segmentation labels), whose bounding box it is; all
    normalised to [0, 1]. ValueError for anything else (a sixth number, an odd count)."""
    numbers = [float(v) for v in values]
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError("not finite")
    width, height = size
    if len(numbers) == 4:
        cx, cy, w, h = numbers
        return [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    if len(numbers) >= 6 and len(numbers) % 2 == 0:
        xs, ys = numbers[0::2], numbers[1::2]
        return [min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height]
    raise ValueError(f"{len(numbers)} numbers")


def _yolo_label_dir(image_dir: Path) -> Path:
    parts = list(image_dir.parts)
    if "images" in parts:
        index = len(parts) - 1 - parts[::-1].index("images")
        parts[index] = "labels"
        return Path(*parts)
    return image_dir.parent / "labels"


# ------------------------------------------------------------------------------ one entry point
def has_split(data_cfg, split: str) -> bool:
    """Whether the `train` or `val` set is configured (YOLO needs only its image folder)."""
    return bool(getattr(data_cfg, f"{split}_annotations")
                or (data_cfg.format == "yolo" and getattr(data_cfg, f"{split}_images")))


def open_dataset(data_cfg, split: str = "train", class_names: list[str] | None = None) -> DetectionDataset:
    """The `train` or `val` set of a `DataConfig`, whatever its `format`. `class_names` (the
    training set's) fixes the label order of a validation set whose format has no ids."""
    images = getattr(data_cfg, f"{split}_images")
    annotations = getattr(data_cfg, f"{split}_annotations")
    listed = read_class_list(data_cfg.classes) if data_cfg.classes else None
    fmt = data_cfg.format
    if fmt == "coco":
        return CocoDetection(images, annotations, strict=data_cfg.strict)
    if fmt == "csv":
        return read_csv(annotations, images or None, listed or class_names, strict=data_cfg.strict)
    if fmt == "voc":
        return read_voc(annotations, images, listed or class_names, data_cfg.voc_difficult, strict=data_cfg.strict)
    if fmt == "yolo":
        return read_yolo(images, annotations or None, listed or class_names or [], strict=data_cfg.strict)
    raise DatasetError(f"data.format {fmt!r}: choose from {', '.join(FORMATS)}")


# ------------------------------------------------------------------------------ writing
_WINDOWS_ROOT = re.compile(r"^(?:[A-Za-z]:|\\)")  # C:..., \\server\share, \root


def relative_image_path(file_name: object, image_dir: Path) -> Path:
    """The path an annotation's `file_name` names relative to `image_dir`, for building an
    output path from it (a label file at the same relative place). ValueError, saying why, for
    a name that could lead anywhere else: not a string, empty, control characters, an absolute
    path outside `image_dir`, a Windows drive or UNC path, or a `..` segment (`/` or `\\`)."""
    if not isinstance(file_name, str) or file_name.strip() in ("", "."):
        raise ValueError("is not a file name")
    if any(ord(c) < 32 or c == "\x7f" for c in file_name):
        raise ValueError("contains control characters")
    try:
        os.fsencode(file_name)
    except UnicodeEncodeError:
        raise ValueError("cannot be a file name on this system") from None
    path = Path(file_name)
    if path.is_absolute():
        base = next((b for b in (image_dir.absolute(), image_dir.resolve()) if path.is_relative_to(b)), None)
        if base is None:
            raise ValueError(f"is an absolute path outside the image folder {image_dir}")
        path = path.relative_to(base)
    if _WINDOWS_ROOT.match(str(path)):
        raise ValueError("is an absolute Windows path")
    if ".." in re.split(r"[\\/]", str(path)):
        raise ValueError("has a '..' segment")
    if str(path) == ".":
        raise ValueError("names the image folder itself")
    return path


class InputGuard:
    """The files and folders a conversion reads, which nothing it writes may replace or enter."""

    def __init__(self, inputs: Iterable[str | Path]):
        self.inputs = [Path(p) for p in inputs if str(p)]

    def hit(self, path: Path, inside: bool = True) -> Path | None:
        """The input that writing `path` would replace (`outputs.same_file`: the same resolved
        path or inode, so a hard link too) or, with `inside`, write into (a path inside an input
        folder); else None."""
        resolved = path.resolve()
        for given in self.inputs:
            if same_file(path, given) or (inside and given.is_dir() and given.resolve() in resolved.parents):
                return given.resolve() if str(given) == "." else given
        return None


def write_coco(dataset: DetectionDataset, path: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """The dataset as a COCO json; `file_name`s relative to the dataset's image folder, so
    that it pairs with `data.train_images` = that folder. Written atomically; refused
    (DatasetError) when `path` is a folder, one of `inputs` (path or inode) or an existing
    file inside an input folder."""
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: is a folder; --output names the COCO json to write")
    hit = InputGuard(inputs).hit(path, inside=os.path.lexists(path))
    if hit is not None:
        raise DatasetError(f"{path}: is, or would replace a file inside, the input {hit}; a conversion never "
                           "writes over its inputs, even with --force (write elsewhere, or remove the file "
                           "yourself)")
    text = json.dumps(dataset.coco_dict())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    except OSError as err:
        raise DatasetError(f"{path}: could not be written ({err.strerror}); nothing was written") from None
    return path


def write_yolo(dataset: DetectionDataset, label_dir: str | Path,
               inputs: Iterable[str | Path] = ()) -> tuple[Path, Path]:
    """One `class cx cy w h` txt per image (crowd boxes left out), at the image's path relative
    to the image folder, and a `classes.txt`. Every path is checked before anything is written
    (DatasetError naming the image and the annotation source): it stays inside `label_dir` after
    symlinks, no two images share a label file (compared ignoring case, as Windows and macOS
    do), and nothing lands on or in `inputs`. A new `label_dir` is filled under a temporary
    name and renamed into place (all or nothing); in an existing one (the caller's --force)
    each file is replaced atomically."""
    label_dir = Path(label_dir)
    if os.path.lexists(label_dir) and not label_dir.is_dir():
        raise DatasetError(f"{label_dir}: is a file, not a folder; --output names the folder to fill with labels")
    guard = InputGuard(inputs)
    hit = guard.hit(label_dir)
    if hit is not None:
        raise DatasetError(f"{label_dir}: the output folder is, or is inside, the input {hit}; write the labels "
                           "outside the input dataset (--force does not change this)")
    planned = _yolo_label_paths(dataset, label_dir)
    _check_label_paths(dataset, label_dir, planned, guard)
    files = [(label, _yolo_lines(record)) for record, label in planned]
    files.append((Path("classes.txt"), "".join(n + "\n" for n in dataset.class_names)))
    _fill_folder(label_dir, files)
    return label_dir, label_dir / "classes.txt"


def _yolo_lines(record: ImageRecord) -> str:
    lines = []
    for (x0, y0, x1, y1), label, crowd in zip(record.boxes, record.labels, record.crowd):
        if crowd:
            continue
        cx, cy = (x0 + x1) / 2 / record.width, (y0 + y1) / 2 / record.height
        w, h = (x1 - x0) / record.width, (y1 - y0) / record.height
        lines.append(f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def _entry(record: ImageRecord) -> str:
    return f"image {record.image_id} ({record.file_name!r})"


def _yolo_label_paths(dataset: DetectionDataset, label_dir: Path) -> list[tuple[ImageRecord, Path]]:
    """Each record with its label file relative to `label_dir`; refuses names that leave it
    and names that share a label file (with each other or with `classes.txt`)."""
    source = dataset.annotation_file
    taken: dict[str, ImageRecord | None] = {"classes.txt": None}
    planned = []
    for record in dataset.records:
        try:
            label = relative_image_path(record.file_name, dataset.image_dir).with_suffix(".txt")
        except ValueError as err:
            raise DatasetError(f"{source}: {_entry(record)}: the file name {err}; its label file would not stay "
                               f"inside the output folder {label_dir}; nothing was written") from None
        key = label.as_posix().casefold()
        if key in taken:
            first = taken[key]
            raise DatasetError(f"{source}: {'the class list' if first is None else _entry(first)} and "
                               f"{_entry(record)} would share the label file {label.as_posix()} in {label_dir} "
                               "(YOLO pairs labels with images by name, ignoring the extension): rename one; "
                               "nothing was written")
        taken[key] = record
        planned.append((record, label))
    return planned


def _check_label_paths(dataset: DetectionDataset, label_dir: Path, planned: list[tuple[ImageRecord, Path]],
                       guard: InputGuard) -> None:
    """Refuse a label path that a symlink leads out of the output folder, or that lands on or in
    an input."""
    root = label_dir.resolve()
    for record, label in [*planned, (None, Path("classes.txt"))]:
        what = "the class list" if record is None else _entry(record)
        target = (label_dir / label).resolve()
        if not target.is_relative_to(root):
            raise DatasetError(f"{dataset.annotation_file}: {what}: its label file {label_dir / label} leads "
                               f"outside the output folder {label_dir} (a symlink to {target}); nothing was written")
        hit = guard.hit(target)
        if hit is not None:
            raise DatasetError(f"{dataset.annotation_file}: {what}: its label file {label_dir / label} would "
                               f"replace or write into the input {hit}; nothing was written")


def _fill_folder(folder: Path, files: list[tuple[Path, str]]) -> None:
    """Write `files` (relative path, text) into `folder`: a new folder is built under a
    temporary name beside it and renamed (a failure leaves no folder); an existing one gets
    each file replaced atomically (a failure leaves every file whole, old or new)."""
    if folder.is_dir():
        for done, (relative, text) in enumerate(files):
            try:
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                write_text(folder / relative, text, sync=False)
            except OutputNotWritten as err:  # a full, read-only or forbidden disk
                raise DatasetError(f"{err}; {done} of {len(files)} files in {folder} were replaced before it, "
                                   "each whole") from None
        return
    stage = folder.with_name(f".{folder.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    relative = Path()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        for relative, text in files:
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            (stage / relative).write_text(text)
        os.rename(stage, folder)
    except OSError as err:
        shutil.rmtree(stage, ignore_errors=True)
        raise DatasetError(f"{folder}: could not write {folder / relative} ({err.strerror}); nothing was "
                           "written") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
