"""Tiled prediction over image files, shared by processes tile by tile, so that one large
raster keeps every process busy.

The images go in blocks of a few per process; each block runs in two phases around a barrier.
First every process takes its share of the units of work of every image of the block
(`tiling.tile_chunks`: batches of tiles, and the whole image resized): the unit `k` of the
image `i` is done by process `(i + k) % world_size`. It appends one line per unit, the unit's
detections in image pixels before merging, to its tile part `parts/tiles-rankRRRRR-of-NNNNN.jsonl`,
on disk (fsync) after each unit. Then each image's owner (`prediction_files.Shard`'s share of
the images) reads the new lines of every tile part, keeps its images' units, merges them and
writes the image's outputs. Memory holds a block's units, whatever the number of images. A
stopped run loses at most one unit per process: `resume` skips the units that the tile parts
hold for the same tiling.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from ..analysis.drawing import draw_detections
from ..data.raster import crs_name, open_raster, pixel_to_crs
from ..outputs import save_image, write_text
from .prediction_files import DRAWING_MAX_SIDE, PARTS, Shard, _drop_torn_line, coco_records, label_path, write_labels
from .tiling import merge_tiles, predict_chunk, tile_chunks

TILE_PARTS = "tiles-rank*-of-*.jsonl"


class TiledFiles:
    """Tiled prediction of image files with `model`, a `prediction_files.TiledRun`; `tiling`
    holds `tile`, `overlap`, `merge`, `full_image` and optionally `value_range` (as
    `retinanet predict` gives them). Each finished image gets its drawing (with `draw`), its
    label file (with `save_txt`) and, when georeferenced, `<drawing>.geojson` in its CRS."""

    def __init__(self, model, tiling: dict, *, score_threshold: float | None = None, batch_size: int = 4,
                 draw: bool = True, save_txt: str | None = None, tta=None):
        self.model, self.tiling, self.tta = model, tiling, tta
        self.score_threshold, self.batch_size, self.draw, self.save_txt = score_threshold, batch_size, draw, save_txt
        # units from a run with other settings are other units: resume does not count them
        self.signature = json.dumps([tiling["tile"], tiling["overlap"], bool(tiling["full_image"]), batch_size,
                                     score_threshold, tiling.get("value_range")])

    def open(self, path: Path):
        return open_raster(path, value_range=self.tiling.get("value_range"))

    def start(self, paths: list[Path], shard: Shard, output_dir: Path, resume: bool) -> None:
        """Before the first block: this process's tile part (an earlier run's kept with
        `resume`, its torn last line cut; otherwise started empty, the main process removing
        the other parts), and with `resume` the units the parts hold for `paths`."""
        self.shard, self.folder = shard, output_dir / PARTS
        names = {str(p) for p in paths}
        self.done = self._read_units(names) if resume else {}
        self.part = self.folder / f"tiles-rank{shard.rank:05d}-of-{shard.world_size:05d}.jsonl"
        if not resume and shard.is_main:
            for old in self.folder.glob(TILE_PARTS):
                if old != self.part:
                    old.unlink()
        if resume and self.part.is_file() and not self.part.is_symlink():
            _drop_torn_line(self.part)
        else:
            write_text(self.part, "")  # replaces a symlink or an earlier run's part
        self.pending = {str(p) for p in paths[shard.rank :: shard.world_size]}  # the images this process finishes
        self.read_to: dict[Path, int] = {}
        self.units: dict[str, dict[int, dict]] = {}  # file name -> unit number -> its line
        if shard.barrier is not None:
            shard.barrier()  # the parts are read and the old ones removed before any process adds to its own

    def predict_units(self, paths: list[Path], first: int) -> None:
        """Phase one for a block: this process's units of `paths` (the images `first`,
        `first + 1`, ... of the run), each appended to its tile part."""
        with open(self.part, "a", encoding="utf-8") as file:
            for i, path in enumerate(paths, first):
                for line in self._predict_image(i, path):
                    file.write(json.dumps({"file_name": str(path), "tiling": self.signature, **line}) + "\n")
                    file.flush()
                    os.fsync(file.fileno())

    def _predict_image(self, i: int, path: Path) -> Iterator[dict]:
        """The lines of this process's units of the image `i` not done yet. An image that
        cannot be opened gives none (its owner reports it in phase two); a window that cannot
        be read ends the image with a line holding the error."""
        shard, done, k = self.shard, self.done.get(str(path), set()), None
        try:
            with self.open(path) as raster:
                chunks = tile_chunks(raster.height, raster.width, self.tiling["tile"], self.tiling["overlap"],
                                     self.batch_size, self.tiling["full_image"])
                for k, chunk in enumerate(chunks):
                    if (i + k) % shard.world_size != shard.rank or k in done:
                        continue
                    boxes, scores, labels, at_cap = predict_chunk(self.model, raster, chunk, self.score_threshold,
                                                                  self.tta)
                    yield {"unit": k, "at_cap": at_cap, "boxes": boxes.tolist(), "scores": scores.tolist(),
                           "labels": labels.tolist()}
        except (OSError, ValueError) as err:  # (ImageReadError is a ValueError)
            if k is not None:
                yield {"unit": k, "error": str(err)}

    def gather(self) -> None:
        """Phase two's reading: the lines added to every tile part since the last call,
        complete ones only, keeping the units of the images this process finishes."""
        for part in sorted(self.folder.glob(TILE_PARTS)):
            if part.is_symlink() or not part.is_file():
                continue
            with open(part, "rb") as file:
                file.seek(self.read_to.get(part, 0))
                data = file.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.read_to[part] = self.read_to.get(part, 0) + len(complete)
            for unit in _units(complete.decode("utf-8", errors="replace").splitlines(), self.signature,
                               self.pending):
                self.units.setdefault(unit["file_name"], {}).setdefault(unit["unit"], unit)

    def finish(self, path: Path, drawing: Path, label_dir: Path) -> tuple[list[dict], int]:
        """Phase two: merge the units of `path` and write its outputs. Returns its records and
        how many of its tiles reached the model's cap on detections per image."""
        self.pending.discard(str(path))
        units = [unit for _, unit in sorted(self.units.pop(str(path), {}).items())]  # in the order one process does them
        failed = [u["error"] for u in units if "error" in u]
        if failed:
            raise ValueError(failed[0])
        with self.open(path) as raster:  # an image phase one could not open: its error, here
            boxes = torch.tensor([b for u in units for b in u["boxes"]], dtype=torch.float32).reshape(-1, 4)
            scores = torch.tensor([v for u in units for v in u["scores"]], dtype=torch.float32)
            labels = torch.tensor([c for u in units for c in u["labels"]], dtype=torch.int64)
            det = merge_tiles(boxes, scores, labels, self.model.class_names, self.tiling["merge"])
            self._write(path, det, raster, drawing, label_dir)
        return coco_records(det, path, self.model.category_ids), sum(u["at_cap"] for u in units)

    def _write(self, path: Path, det: dict, raster, drawing: Path, label_dir: Path) -> None:
        if self.draw:
            overview = raster.read_scaled(DRAWING_MAX_SIDE)
            shrink = overview.shape[-1] / raster.width, overview.shape[-2] / raster.height
            shown = {**det, "boxes": det["boxes"] * torch.tensor(shrink * 2)}
            save_image(draw_detections(overview, shown, max_boxes=len(det["boxes"])), drawing, sync=False,
                       quality=92)
        if self.save_txt is not None:
            write_labels(det, (raster.height, raster.width), label_path(label_dir, drawing, self.save_txt),
                         self.save_txt)
        if raster.transform is not None:
            write_geojson(det, raster, drawing.with_suffix(".geojson"), self.model.category_ids)
        elif raster.georeferenced_without_reader:
            print(f"note: {path} is a GeoTIFF; install rasterio (pip install 'retinanet[geo]') to get "
                  "its detections as GeoJSON in its coordinate system", file=sys.stderr)

    def _read_units(self, names: set[str]) -> dict[str, set[int]]:
        """The unit numbers that the tile parts hold for this tiling, by file name (of `names`)."""
        found: dict[str, set[int]] = {}
        if not self.folder.is_dir() or self.folder.is_symlink():
            return found
        for part in sorted(self.folder.glob(TILE_PARTS)):
            if part.is_symlink() or not part.is_file():
                continue
            with open(part, encoding="utf-8", errors="replace") as file:
                for unit in _units(file, self.signature, names):
                    found.setdefault(unit["file_name"], set()).add(unit["unit"])
        return found


def _units(lines, signature: str, names: set[str]) -> Iterator[dict]:
    """The units among `lines` (JSON, one a line) of the tiling `signature` and of `names`;
    lines that do not parse (torn by a stopped process) are left out."""
    for line in lines:
        try:
            unit = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(unit, dict) and unit.get("tiling") == signature and unit.get("file_name") in names:
            yield unit


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
