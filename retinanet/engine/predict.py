"""Prediction over image files: COCO-style json, and the boxes drawn on the images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..data.image_io import ImageReadError, read_image
from ..data.raster import crs_name, open_raster, pixel_to_crs
from ..outputs import check_writable, save_image, write_text
from .evaluate import autocast
from .prediction_files import coco_records, collect_images
from .tiling import predict_tiled


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


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes the images in DataLoader workers; a bad file gives its error instead."""

    def __init__(self, paths: list[Path], check_size):
        self.paths, self.check_size = paths, check_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = read_image(path)
            if self.check_size is not None:
                self.check_size(tuple(image.shape[-2:]), name=str(path))
            return path, image
        except (ImageReadError, ValueError) as err:
            return path, str(err)


def predict_files(model, inputs: list[str | Path], output_dir: str | Path, score_threshold: float | None = None,
                  draw: bool = True, batch_size: int = 4, tiling: dict | None = None, workers: int = 2,
                  save_txt: str | None = None, progress: bool = True,
                  amp: str = "none") -> tuple[list[dict], list[str]]:
    """Detect in every readable image; bad inputs are reported (one line each) and skipped.

    Images are decoded by `workers` DataLoader processes and run in batches of `batch_size`.
    Writes `output_dir/predictions.json` (`file_name`, `category_id`, `category_name`, `bbox`
    [x, y, w, h], `score`); with `draw`, a drawn copy of each image (never over an input); with
    `save_txt` ("yolo" or "csv"), one file per image in `output_dir/labels/`: YOLO's normalised
    `class cx cy w h score` lines, or `x1,y1,x2,y2,score,class_name` rows. With `tiling`
    (`tile`, `overlap`, `merge`, `full_image`, optional `value_range`), each image is predicted on
    overlapping tiles at full resolution. `amp` ("none", "bf16" or "fp16", as `resolve_amp` gives it): the network
    runs in that autocast precision. Returns the predictions and the error lines. Every file is
    written atomically (per-image files without an fsync each) and replaces (never follows) a symlink
    at its name; an output folder
    that cannot be written is refused before any work (`OutputNotWritten`).
    """
    output_dir = check_writable(Path(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths, errors = collect_images(inputs)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    drawn = drawn_names(paths, output_dir)
    bar = _progress_bar(len(paths), progress)
    device_type = next(model.parameters()).device.type if amp != "none" else "cpu"
    try:
        with autocast(amp, device_type):
            if tiling is not None:
                predictions = _predict_tiled_files(model, paths, drawn, draw, score_threshold, tiling, save_txt,
                                                   output_dir / "labels", errors, bar)
            else:
                predictions = _predict_batched_files(model, paths, drawn, draw, score_threshold, batch_size,
                                                     workers, save_txt, output_dir / "labels", errors, bar)
    finally:
        if bar is not None:
            bar.close()
    write_text(output_dir / "predictions.json", json.dumps(predictions, indent=1))
    return predictions, errors


def _predict_batched_files(model, paths: list[Path], names: dict[Path, Path], draw: bool, score_threshold,
                           batch_size: int, workers: int, save_txt: str | None, label_dir: Path, errors: list[str],
                           bar) -> list[dict]:
    """Whole images, decoded by `workers` DataLoader processes, in batches of `batch_size`."""
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, model.preprocessor.check_size), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    predictions: list[dict] = []
    for items in loader:
        good = []
        for path, item in items:
            if isinstance(item, str):
                errors.append(item)
                print(f"error: {item}", file=sys.stderr)
            else:
                good.append((path, item))
        if good:
            predictions.extend(_run(model, good, names, draw, score_threshold, save_txt, label_dir))
        if bar is not None:
            bar.update(len(items))
    return predictions


def _run(model, items, names: dict[Path, Path], draw: bool, score_threshold, save_txt: str | None = None,
         label_dir: Path | None = None) -> list[dict]:
    """Detect in `items` (`(path, image)`), write the drawings (to `names[path]`) and label
    files asked for, and return the COCO-style records."""
    outputs = model.predict([image for _, image in items], score_threshold=score_threshold)
    records = []
    for (path, image), det in zip(items, outputs):
        records += coco_records(det, path, model.category_ids)
        if draw:
            save_image(draw_detections(image, det), names[path], sync=False, quality=92)
        if save_txt is not None:
            write_labels(det, tuple(image.shape[-2:]), label_path(label_dir, names[path], save_txt), save_txt)
    return records


DRAWING_MAX_SIDE = 4096  # drawings of larger images are shrunk to this


def _predict_tiled_files(model, paths: list[Path], names: dict[Path, Path], draw: bool, score_threshold,
                         tiling: dict, save_txt: str | None, label_dir: Path, errors: list[str],
                         bar) -> list[dict]:
    """Tiled prediction, one image at a time, each read by windows where it pays
    (`data.raster`); a georeferenced image also gets `<name>.geojson` in its CRS."""
    records = []
    for path in paths:
        try:
            with open_raster(path, value_range=tiling.get("value_range")) as raster:
                det = predict_tiled(model, raster, tiling["tile"], tiling["overlap"], merge=tiling["merge"],
                                    full_image=tiling["full_image"], score_threshold=score_threshold)
                records += coco_records(det, path, model.category_ids)
                if draw:
                    overview = raster.read_scaled(DRAWING_MAX_SIDE)
                    shrink = overview.shape[-1] / raster.width, overview.shape[-2] / raster.height
                    shown = {**det, "boxes": det["boxes"] * torch.tensor(shrink * 2)}
                    save_image(draw_detections(overview, shown, max_boxes=len(det["boxes"])), names[path], sync=False,
                               quality=92)
                if save_txt is not None:
                    write_labels(det, (raster.height, raster.width), label_path(label_dir, names[path], save_txt),
                                 save_txt)
                if raster.transform is not None:
                    write_geojson(det, raster, names[path].with_suffix(".geojson"), model.category_ids)
                elif raster.georeferenced_without_reader:
                    print(f"note: {path} is a GeoTIFF; install rasterio (pip install 'retinanet[geo]') to get "
                          "its detections as GeoJSON in its coordinate system", file=sys.stderr)
        except (ImageReadError, ValueError) as err:
            errors.append(str(err))
            print(f"error: {err}", file=sys.stderr)
        if bar is not None:
            bar.update(1)
    return records


def _progress_bar(total: int, enabled: bool):
    """A progress bar of `total` images on a terminal, else None."""
    if not (enabled and total and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="image")


def write_geojson(det: dict, raster, path: Path, category_ids: list[int]) -> Path:
    """Detections as a GeoJSON FeatureCollection of box polygons in the raster's CRS (named
    in the legacy `crs` member, as GDAL and QGIS read it), each with its pixel box."""
    features = []
    for ring, box, score, label, name in zip(pixel_to_crs(det["boxes"], raster.transform), det["boxes"].tolist(),
                                             det["scores"].tolist(), det["labels"].tolist(), det["class_names"]):
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"category_name": name, "category_id": category_ids[label],
                                        "score": round(score, 5), "bbox_pixels": [round(v, 2) for v in box]}})
    collection = {"type": "FeatureCollection", "features": features}
    if raster.crs is not None:
        collection["crs"] = {"type": "name", "properties": {"name": crs_name(raster.crs)}}
    return write_text(path, json.dumps(collection))


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


def draw_detections(image: torch.Tensor, det: dict, max_boxes: int = 100, scale: int = 1,
                    ground_truth: torch.Tensor | None = None) -> Image.Image:
    """The image `(3, H, W)` uint8, enlarged `scale` times, with the `max_boxes` best boxes,
    their class names and scores on a dark label background (placed by `place_labels`, so
    that labels of overlapping boxes do not cover each other); `ground_truth (G, 4)` boxes,
    when given, outlined in white. A `det` without scores (annotations) is labelled by name."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.BILINEAR)
    canvas = ImageDraw.Draw(pil)
    if ground_truth is not None:
        for box in (ground_truth * scale).tolist():
            canvas.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], outline=(255, 255, 255), width=1)
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    scores = det["scores"].tolist() if "scores" in det else [None] * len(det["boxes"])
    shown = sorted(zip(scores, det["boxes"].tolist(), det["labels"].tolist(), det["class_names"]),
                   key=lambda d: -(d[0] or 0))[:max_boxes]
    boxes = [[v * scale for v in box] for _, box, _, _ in shown]
    colours = [palette[label % len(palette)] for _, _, label, _ in shown]
    texts = [name if score is None else f"{name} {score:.2f}" for score, _, _, name in shown]
    for box, colour in zip(boxes, colours):  # all boxes first: no box line crosses a label
        canvas.rectangle(box, outline=colour, width=2)
    extents = [canvas.textbbox((0, 0), text) for text in texts]
    sizes = [(right - left + 2, bottom - top + 2) for left, top, right, bottom in extents]
    for (x, y), text, size, (left, top, _, _), colour in zip(place_labels(boxes, sizes, pil.size), texts, sizes,
                                                             extents, colours):
        canvas.rectangle([x, y, x + size[0], y + size[1]], fill=(0, 0, 0))
        canvas.text((x + 1 - left, y + 1 - top), text, fill=colour)
    return pil


def place_labels(boxes: list[list[float]], sizes: list[tuple[int, int]],
                 image_size: tuple[int, int]) -> list[tuple[float, float]]:
    """Top-left corners for the labels of `boxes` (xyxy, best first) of `sizes` (w, h) in an
    image of `image_size` (w, h): each at the first of its box's top-left inside, above, bottom-left
    inside and below that stays in the image and overlaps no label placed before it; if none
    does, at the first that stays in the image."""
    width, height = image_size
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x0, y0, _, y1), (w, h) in zip(boxes, sizes):
        x = min(max(x0 + 1, 0), max(width - w, 0))
        spots = [(x, y) for y in (y0 + 1, y0 - h - 1, y1 - h - 1, y1 + 1) if 0 <= y <= height - h] or [(x, 0)]
        free = [(sx, sy) for sx, sy in spots
                if not any(sx < r and px < sx + w and sy < b and py < sy + h for px, py, r, b in placed)]
        corner = (free or spots)[0]
        placed.append((corner[0], corner[1], corner[0] + w, corner[1] + h))
        corners.append(corner)
    return corners
