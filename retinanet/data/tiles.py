"""The tile grid (`tile_windows`), for training and prediction alike, and training on images
far larger than the network input: every image is cut into overlapping tiles on the fly, and
each tile is a training item of its own. Prediction on tiles is `engine.tiling`."""

from __future__ import annotations

import hashlib

import torch

from .dataset import DetectionDataset, ImageRecord, augment, crop_boxes, sampled_item
from .image_io import ImageReadError
from .raster import Raster, open_raster


def tile_step(tile: int, overlap: float) -> int:
    """The distance in pixels between the starts of neighbouring tiles of `tile` px that
    share `overlap` of a tile (at least 1)."""
    if tile <= 0 or not 0 <= overlap < 1:
        raise ValueError(f"tile {tile} must be > 0 and overlap {overlap} in [0, 1)")
    return max(1, int(tile * (1 - overlap)))


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """`(x0, y0, x1, y1)` windows of at most `tile` px that cover the image, neighbours
    sharing `overlap` of a tile; the last row and column are flush with the image edge."""
    step = tile_step(tile, overlap)

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        return list(range(0, size - tile, step)) + [size - tile]

    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in starts(height) for x in starts(width)]


class TiledDataset(DetectionDataset):
    """The tiles of every image of `base` as items. Tiles without any kept box are kept for
    a deterministic `empty_ratio` share of them. Tiles are read by windows where that pays
    (`data.raster`: TIFFs and very large images, with rasterio; data that is not 8-bit scaled by
    `value_range`, else by its own range); otherwise the last decoded image is kept, so that the
    tiles of one image, taken in order, decode it once."""

    def __init__(self, base: DetectionDataset, tile: int, overlap: float = 0.2, min_visible: float = 0.5,
                 empty_ratio: float = 1.0, value_range: list[float] | None = None):
        self.base, self.tile, self.overlap, self.min_visible = base, tile, overlap, min_visible
        self.value_range = value_range
        self.windows: list[tuple[int, tuple[int, int, int, int]]] = []
        records = []
        for index, record in enumerate(base.records):
            boxes = torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
            for window in tile_windows(record.height, record.width, tile, overlap):
                shifted, kept, partial = crop_boxes(boxes, window, min_visible)
                if not kept.any() and not _keep_empty(record.file_name, window, empty_ratio):
                    continue
                use = kept | partial
                labels = torch.tensor(record.labels, dtype=torch.long)[use].tolist()
                crowd = (torch.tensor(record.crowd, dtype=torch.bool) | partial)[use].tolist()
                x0, y0, x1, y1 = window
                records.append(ImageRecord(len(records) + 1, f"{record.file_name}@{x0},{y0}", x1 - x0, y1 - y0,
                                           shifted[use].tolist(), labels, crowd))
                self.windows.append((index, window))
        super().__init__(base.image_dir, base.annotation_file, records, base.category_ids, base.class_names,
                         base.report, base.strict)
        self.format = base.format
        self._cache: tuple[int, Raster] | None = None

    def __getstate__(self) -> dict:  # an open file does not travel to DataLoader workers
        return {**self.__dict__, "_cache": None}

    def __getitem__(self, item):
        index, flip, zoom, ops = sampled_item(item)
        image_index, (x0, y0, x1, y1) = self.windows[index]
        path = self.base.image_dir / self.base.records[image_index].file_name
        try:
            if self._cache is None or self._cache[0] != image_index:
                if self._cache is not None:
                    self._cache[1].close()
                    self._cache = None
                self._cache = (image_index, open_raster(path, value_range=self.value_range))
            crop = self._cache[1].read((x0, y0, x1, y1))
        except ImageReadError:
            if self.strict:
                raise
            return ImageReadError(path, "unreadable (tiled training)")
        record = self.records[index]
        target = {"boxes": torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(record.labels, dtype=torch.long),
                  "iscrowd": torch.tensor(record.crowd, dtype=torch.bool), "image_id": record.image_id}
        return augment(crop, target, flip, zoom, ops)


def as_training_items(dataset: DetectionDataset, tile, value_range: list[float] | None = None) -> DetectionDataset:
    """What the trainer iterates over: the tiles of every image when `tile.size` > 0 (a
    `TileConfig`; `value_range` as `data.value_range`), else the images themselves."""
    if tile.size <= 0:
        return dataset
    return TiledDataset(dataset, tile.size, tile.overlap, tile.min_visible, tile.empty_ratio, value_range)


def _keep_empty(name: str, window, ratio: float) -> bool:
    if ratio >= 1:
        return True
    digest = hashlib.sha1(f"{name}{window}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < ratio
