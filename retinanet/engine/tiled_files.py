"""Tiled prediction over image files, shared by processes tile by tile, so that one large
raster keeps every process busy.

It runs in two phases around a barrier. First every process takes its share of the units of
work of every image (`tiling.tile_chunks`: batches of tiles, and the whole image resized): the
unit `k` of the image `i` is done by process `(i + k) % world_size`. It appends one line per
unit, the unit's detections in image pixels before merging, to its tile part
`parts/tiles-rankRRRRR-of-NNNNN.jsonl`, on disk (fsync) after each unit. Then each image's
owner (`prediction_files.Shard`'s share of the images) gathers its units from every tile part,
merges them and writes the image's outputs. A stopped run loses at most one unit per process:
`resume` skips the units that the tile parts hold for the same tiling.
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
from .prediction_files import (DRAWING_MAX_SIDE, PARTS, Shard, _drop_torn_line, coco_records, label_path,
                               progress_bar, write_labels)
from .tiling import Chunk, merge_tiles, predict_chunk, tile_chunks

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
        self.units: dict[str, list[dict]] = {}

    def open(self, path: Path):
        return open_raster(path, value_range=self.tiling.get("value_range"))

    def predict_units(self, paths: list[Path], shard: Shard, output_dir: Path, resume: bool,
                      progress: bool = True) -> None:
        """Phase one: this process's units of `paths`, each appended to its tile part. An
        image that cannot be opened is left to its owner, who reports it in phase two."""
        folder = output_dir / PARTS
        done = self._read_units(folder, keys_only=True) if resume else {}
        part = folder / f"tiles-rank{shard.rank:05d}-of-{shard.world_size:05d}.jsonl"
        if not resume and shard.is_main:
            for old in folder.glob(TILE_PARTS):
                if old != part:
                    old.unlink()
        if resume and part.is_file() and not part.is_symlink():
            _drop_torn_line(part)
        else:
            write_text(part, "")  # replaces a symlink or an earlier run's part
        if shard.barrier is not None:
            shard.barrier()  # the parts are read and the old ones removed before any process adds to its own
        work = self._share(paths, shard, done)
        bar = progress_bar(len(work), progress and shard.is_main)
        with open(part, "a", encoding="utf-8") as file:
            for path in dict.fromkeys(path for path, _, _ in work):
                units = [(k, chunk) for p, k, chunk in work if p == path]
                for line in self._predict_image(path, units):
                    file.write(json.dumps({"file_name": str(path), "tiling": self.signature, **line}) + "\n")
                    file.flush()
                    os.fsync(file.fileno())
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()

    def _predict_image(self, path: Path, units: list[tuple[int, Chunk]]) -> Iterator[dict]:
        """The lines of `units` of one image; a window that cannot be read ends the image with
        a line holding the error, which its owner reports in phase two."""
        k = units[0][0]
        try:
            with self.open(path) as raster:
                for k, chunk in units:
                    boxes, scores, labels, at_cap = predict_chunk(self.model, raster, chunk, self.score_threshold,
                                                                  self.tta)
                    yield {"unit": k, "at_cap": at_cap, "boxes": boxes.tolist(), "scores": scores.tolist(),
                           "labels": labels.tolist()}
        except (OSError, ValueError) as err:  # (ImageReadError is a ValueError)
            yield {"unit": k, "error": str(err)}

    def _share(self, paths: list[Path], shard: Shard, done: dict[str, set[int]]) -> list[tuple]:
        """`(path, unit, chunk)` of this process's units not in `done`: the unit `k` of the
        image `i` goes to process `(i + k) % world_size`."""
        work = []
        for i, path in enumerate(paths):
            try:
                with self.open(path) as raster:
                    chunks = tile_chunks(raster.height, raster.width, self.tiling["tile"], self.tiling["overlap"],
                                         self.batch_size, self.tiling["full_image"])
            except (OSError, ValueError):  # (ImageReadError is a ValueError) its owner reports it in phase two
                continue
            work += [(path, k, chunk) for k, chunk in enumerate(chunks)
                     if (i + k) % shard.world_size == shard.rank and k not in done.get(str(path), ())]
        return work

    def gather(self, output_dir: Path, paths: list[Path]) -> None:
        """Read the units of `paths` (the images this process finishes) from every tile part."""
        self.units = {name: [units[k] for k in sorted(units)] for name, units in  # in the order one process does them
                      self._read_units(output_dir / PARTS, names={str(p) for p in paths}).items()}

    def finish(self, path: Path, drawing: Path, label_dir: Path) -> tuple[list[dict], int]:
        """Phase two: merge the units of `path` and write its outputs. Returns its records and
        how many of its tiles reached the model's cap on detections per image."""
        units = self.units.pop(str(path), [])
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

    def cap_note(self, tiles: int) -> str | None:
        """The note a tiled run prints once when `tiles` tiles reached the model's cap."""
        cap = getattr(getattr(self.model, "postprocessor", None), "detections_per_image", None)
        if not tiles or cap is None:
            return None
        return (f"note: {tiles} tile(s) reached the cap of {cap} detections per tile, which dropped their "
                "lower-scored detections; raise it with retinanet predict --max-detections N "
                "(model.inference.detections_per_image)")

    def _read_units(self, folder: Path, names: set[str] | None = None, keys_only: bool = False) -> dict:
        """The units of this tiling that the tile parts in `folder` hold, by file name then
        unit number (of `names` only, when given; with `keys_only`, the unit numbers alone);
        torn lines and symlinks are left out."""
        found: dict = {}
        if not folder.is_dir() or folder.is_symlink():
            return found
        for part in sorted(folder.glob(TILE_PARTS)):
            if part.is_symlink() or not part.is_file():
                continue
            with open(part, encoding="utf-8", errors="replace") as file:
                for line in file:
                    try:
                        unit = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if not (isinstance(unit, dict) and unit.get("tiling") == self.signature
                            and (names is None or unit.get("file_name") in names)):
                        continue
                    if keys_only:
                        found.setdefault(unit["file_name"], set()).add(unit["unit"])
                    else:
                        found.setdefault(unit["file_name"], {}).setdefault(unit["unit"], unit)
        return found


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
