"""Images far larger than the network input: prediction on overlapping tiles at full
resolution, merged back into one set of detections, and the checks of a tile size against a
model's anchors. The tile grid itself, shared with training on tiles, is `data.tiles`."""

from __future__ import annotations

import functools

import torch
from torchvision.ops import batched_nms, box_area

from ..data.raster import ArrayRaster, Raster
from ..data.tiles import tile_step, tile_windows
from ..model.config import ConfigError
from .prediction_files import detection_cap

__all__ = ["merge_detections", "merge_tiles", "predict_chunk", "predict_tiled", "tile_chunks", "tiling_problem",
           "small_tile_warning", "check_tile_config"]

MAX_TILE_WORK = 16  # an overlap may make at most this many times the tiles of overlap 0 (overlap 0.75)


def tiling_problem(tile: int, overlap: float, anchor_sizes: list[list[float]]) -> str | None:
    """Why tiles of `tile` px sharing `overlap` are not worth running with a model of these
    `model.anchors.sizes`, or None: a tile smaller than the smallest anchor holds no object
    the model can find, and an overlap that makes more than `MAX_TILE_WORK` times the tiles
    of overlap 0 multiplies the time (each pixel runs that many times) for no new object."""
    smallest = min(min(level) for level in anchor_sizes)
    if tile < smallest:
        return (f"tiles of {tile} px are smaller than the model's smallest anchor ({smallest:g} px): no object "
                "it can find fits in one")
    work = (tile / tile_step(tile, overlap)) ** 2
    if work > MAX_TILE_WORK:
        return (f"overlap {overlap:g} makes {work:,.0f}x the tiles of overlap 0 with tiles of {tile} px (the "
                f"bound is {MAX_TILE_WORK}x, overlap 0.75)")
    return None


def small_tile_warning(tile: int, input_config) -> str | None:
    """One line when tiles are under half the side the model resizes them to (`model.input`:
    its shortest test or training side, capped by `max_size`), which enlarges every tile and
    its objects; None otherwise."""
    if not input_config.resize:
        return None
    side = min(input_config.test_min_size, *input_config.train_min_sizes, input_config.max_size)
    if 2 * tile > side:
        return None
    return (f"tiles of {tile} px are far smaller than the model's input of {side} px: each is enlarged "
            f"{side / tile:.1f}x, its objects with it; give tiles the input size ({side})")


def check_tile_config(tile, model_config) -> str | None:
    """Check a `data.tile` config against the `ModelConfig` it runs with: a tiling that
    `tiling_problem` refuses raises `ConfigError` unless `tile.force`; returns the
    `small_tile_warning` line, or None (also when tiling is off)."""
    if tile is None or tile.size <= 0:
        return None
    problem = tiling_problem(tile.size, tile.overlap, model_config.anchors.sizes)
    if problem and not tile.force:
        raise ConfigError(f"data.tile.size={tile.size}, data.tile.overlap={tile.overlap:g}: {problem}; set "
                          "data.tile.force=true to run it anyway")
    return small_tile_warning(tile.size, model_config.input)


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, method: str = "nms",
                     threshold: float = 0.5) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Merge detections gathered from overlapping tiles.

    `nms`: class-aware NMS at IoU `threshold`; returns the kept `(boxes, scores, labels)`.
    `nmm`: greedy non-maximum merging: best first, every same-class box whose intersection
    over the smaller area (IoS) with it is >= `threshold` is merged into it (the union of the
    boxes, the best score), so that an object cut by a tile border comes out once, whole.
    """
    if method == "nms":
        keep = batched_nms(boxes, scores, labels, threshold)
        return boxes[keep], scores[keep], labels[keep]
    if method != "nmm":
        raise ValueError(f"merge must be 'nms' or 'nmm', got {method!r}")
    order = scores.argsort(descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    alive = torch.ones(len(boxes), dtype=torch.bool)
    out_boxes, out_scores, out_labels = [], [], []
    areas = box_area(boxes)
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        ios = inter / torch.minimum(areas[i], areas).clamp(min=1e-9)
        group = alive & (labels == labels[i]) & (ios >= threshold)
        group[i] = True
        members = boxes[group]
        out_boxes.append(torch.cat([members[:, :2].min(dim=0).values, members[:, 2:].max(dim=0).values]))
        out_scores.append(scores[i])
        out_labels.append(labels[i])
        alive &= ~group
    if not out_boxes:
        return boxes[:0], scores[:0], labels[:0]
    return torch.stack(out_boxes), torch.stack(out_scores), torch.stack(out_labels)


Window = tuple[int, int, int, int]
Chunk = list[Window] | None  # a batch of tile windows, or None: the whole image, resized


def tile_chunks(height: int, width: int, tile: int, overlap: float, batch_size: int,
                full_image: bool = False) -> list[Chunk]:
    """The units of work of tiled prediction on an image of `height x width`: the tile windows
    (`data.tiles.tile_windows`) in batches of `batch_size`, and with `full_image` a last unit
    `None`, the whole image resized."""
    windows = tile_windows(height, width, tile, overlap)
    chunks: list[Chunk] = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    return chunks + [None] if full_image else chunks


@torch.inference_mode()
def predict_chunk(model, raster: Raster, chunk: Chunk, score_threshold: float | None = None, tta=None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The detections of one unit of `tile_chunks` in the image's pixels, not merged: boxes
    `(D, 4)`, scores `(D,)`, labels `(D,)`, and how many of its tiles reached the model's cap
    on detections per image (`model.postprocessor.detections_per_image`)."""
    predict = model.predict if tta is None else functools.partial(model.predict, tta=tta)
    if chunk is None:
        # the model shrinks the whole image to its input size anyway: read it at about that size
        max_side = getattr(getattr(model, "preprocessor", None), "max_size", None) or max(raster.height, raster.width)
        overview = raster.read_scaled(max_side)
        sy, sx = overview.shape[-2] / raster.height, overview.shape[-1] / raster.width
        det = predict(overview, score_threshold=score_threshold)
        return det["boxes"] / torch.tensor([sx, sy, sx, sy]), det["scores"], det["labels"], 0
    crops = [raster.read(window) for window in chunk]
    detections = predict(crops, score_threshold=score_threshold, batch_size=len(crops))
    cap = detection_cap(model)
    boxes = [det["boxes"] + torch.tensor([x0, y0, x0, y0], dtype=det["boxes"].dtype)
             for (x0, y0, _, _), det in zip(chunk, detections)]
    at_cap = sum(cap is not None and len(det["scores"]) >= cap for det in detections)
    return (torch.cat(boxes), torch.cat([d["scores"] for d in detections]),
            torch.cat([d["labels"] for d in detections]), at_cap)


def merge_tiles(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                merge: str = "nms", merge_threshold: float = 0.5, max_detections: int | None = None) -> dict:
    """The detections of every unit of an image, gathered, merged (`merge_detections`) and
    sorted best first (the best `max_detections` when given), as `model.predict` gives them."""
    boxes, scores, labels = merge_detections(boxes, scores, labels, merge, merge_threshold)
    order = scores.argsort(descending=True)
    if max_detections:
        order = order[:max_detections]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    return {"boxes": boxes, "scores": scores, "labels": labels, "class_names": [class_names[i] for i in labels.tolist()]}


@torch.inference_mode()
def predict_tiled(model, source: torch.Tensor | Raster, tile: int, overlap: float = 0.2, batch_size: int = 4,
                  merge: str = "nms", merge_threshold: float = 0.5, full_image: bool = False,
                  score_threshold: float | None = None, max_detections: int | None = None, tta=None) -> dict:
    """Detections in a large image from overlapping tiles at full resolution (and, with
    `full_image`, from the whole image resized, as SAHI does), shifted back to image pixels
    and merged. `source` is a `(3, H, W)` tensor or a `Raster` (`data.raster.open_raster`),
    whose windows are read a batch at a time, so that memory does not grow with the image.
    Tiles run through the model in batches of `batch_size`. Give tiles the size of the
    model's input (`model.input.test_min_size`) so that they are not resized. With `tta` (a
    `TestTimeAugmentation`), each tile, and the whole image, is predicted with its views
    merged before the tiles are merged. Returns
    `{"boxes", "scores", "labels", "class_names"}` like `model.predict`."""
    raster = source if isinstance(source, Raster) else ArrayRaster(source)
    pieces = [predict_chunk(model, raster, chunk, score_threshold, tta)
              for chunk in tile_chunks(raster.height, raster.width, tile, overlap, batch_size, full_image)]
    boxes, scores, labels = (torch.cat([piece[i] for piece in pieces]) for i in range(3))
    return merge_tiles(boxes, scores, labels, model.class_names, merge, merge_threshold, max_detections)
