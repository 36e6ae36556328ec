"""Searching anchor sizes, scales and aspect ratios that cover a dataset's boxes.

Candidates are scored on the real grid: for a box and a level, the anchors that can overlap
it most are those of the grid location nearest its centre (IoU falls as the centres move
apart along either axis), so the best IoU of a box is that location's best anchor, over all
levels. The chosen set is then re-checked with the full matcher (`coverage.py`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from ..model.anchors import cell_anchors


@dataclass
class AnchorCandidate:
    sizes: list[list[float]]
    aspect_ratios: list[float]
    uncovered_fraction: float
    input_scale: float = 1.0  # the network input size relative to the config's

    @property
    def per_location(self) -> int:
        return len(self.sizes[0]) * len(self.aspect_ratios)


def best_iou_on_grid(boxes: torch.Tensor, sizes: list[list[float]], aspect_ratios: list[float],
                     strides: list[int], offset: float = 0.0) -> torch.Tensor:
    """Best IoU of each box `(N, 4)` with the anchors of `sizes`/`aspect_ratios` laid on
    the grids of `strides` (anchor centres at `(i + offset) * stride`): `(N,)`."""
    return best_iou_on_grids(boxes, [sizes], aspect_ratios, strides, offset)[0]


def best_iou_on_grids(boxes: torch.Tensor, size_sets: list[list[list[float]]], aspect_ratios: list[float],
                      strides: list[int], offset: float = 0.0, max_elements: int = 1 << 22) -> torch.Tensor:
    """`best_iou_on_grid` for several anchor size sets at once, each with the same number of
    sizes per level: `(len(size_sets), N)`, the same numbers as one call per set. The work
    that depends on the boxes only (distances to the nearest anchor centres) is done once per
    level, and the sets are taken in groups of at most `max_elements` box-anchor pairs."""
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = boxes[:, 2:] - boxes[:, :2]
    best = torch.zeros(len(size_sets), len(boxes))
    for level, stride in enumerate(strides):
        grid = (torch.round(centres / stride - offset) + offset) * stride
        d = (centres - grid).abs()  # (N, 2) distance to the nearest anchor centre
        cells = torch.stack([cell_anchors(s[level], aspect_ratios) for s in size_sets])  # (C, A, 4) centred at 0
        a_wh = cells[..., 2:] - cells[..., :2]  # (C, A, 2)
        group = max(1, max_elements // max(1, len(boxes) * a_wh.shape[1]))
        for start in range(0, len(size_sets), group):
            part = a_wh[start : start + group, None]  # (c, 1, A, 2)
            overlap = ((wh[:, None] + part) / 2 - d[:, None]).clamp(min=0)  # (c, N, A, 2)
            overlap = torch.minimum(overlap, torch.minimum(wh[:, None], part).expand_as(overlap))
            inter = overlap[..., 0] * overlap[..., 1]
            union = (wh[:, 0] * wh[:, 1])[:, None] + (part[..., 0] * part[..., 1]) - inter
            best[start : start + group] = torch.maximum(best[start : start + group], (inter / union).max(dim=-1).values)
    return best


def level_sizes(base: float, num_levels: int, scales: int) -> list[list[float]]:
    """Sizes `base * 2^level * 2^(i / scales)`: one octave per level, `scales` per octave."""
    return [[round(base * 2**level * 2 ** (i / scales), 2) for i in range(scales)] for level in range(num_levels)]


def ratio_sets(boxes: torch.Tensor, max_ratios: int = 5) -> list[list[float]]:
    """Candidate aspect-ratio (h / w) sets: 1..max_ratios clusters of the boxes' log aspect
    ratios (k-means in one dimension), and the paper's {1/2, 1, 2}."""
    log_ratio = torch.log((boxes[:, 3] - boxes[:, 1]) / (boxes[:, 2] - boxes[:, 0]))
    sets = [[0.5, 1.0, 2.0]]
    for k in range(1, max_ratios + 1):
        centres = _kmeans_1d(log_ratio, k)
        sets.append(sorted({round(math.exp(c), 3) for c in centres}))
    unique = []
    for s in sets:
        if s not in unique:
            unique.append(s)
    return unique


def _kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> list[float]:
    quantiles = torch.quantile(values, torch.linspace(0, 1, k + 2)[1:-1])
    centres = quantiles.clone()
    for _ in range(iterations):
        assign = (values[:, None] - centres[None]).abs().argmin(dim=1)
        for j in range(k):
            members = values[assign == j]
            if len(members):
                centres[j] = members.mean()
    return centres.tolist()


def search_anchors(boxes: torch.Tensor, strides: list[int], fg_iou_threshold: float, offset: float = 0.0,
                   scale_options: tuple[int, ...] = (1, 2, 3, 4), tolerance: float = 0.01,
                   input_scale: float = 1.0, max_boxes: int = 2048) -> tuple[AnchorCandidate, list[AnchorCandidate]]:
    """The anchor set with the fewest anchors per location whose uncovered share is within
    `tolerance` of the best found, and the best candidate for each anchors-per-location
    count (the trade-off). `boxes (N, 4)` are in network-input pixels.

    Candidates are scored on a fixed random sample of at most `max_boxes` boxes, so that the
    search costs the same on a dense dataset as on a sparse one; the caller checks the
    chosen set on every box with the full matcher."""
    if len(boxes) == 0:
        raise ValueError("no boxes to fit anchors to")
    if len(boxes) > max_boxes:
        boxes = boxes[torch.randperm(len(boxes), generator=torch.Generator().manual_seed(0))[:max_boxes]]
    sides = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    low = max(2.0, float(sides.min()) / 2)
    high = max(low * 2, float(torch.quantile(sides, 0.5)))
    bases = [low * 2 ** (i / 6) for i in range(int(6 * math.log2(high / low)) + 1)]
    candidates = []
    for ratios, scales in itertools.product(ratio_sets(boxes), scale_options):
        size_sets = [level_sizes(base, len(strides), scales) for base in bases]
        best_iou = best_iou_on_grids(boxes, size_sets, ratios, strides, offset)
        uncovered = (best_iou < fg_iou_threshold).float().mean(dim=1).tolist()
        candidates += [AnchorCandidate(sizes, ratios, u, input_scale) for sizes, u in zip(size_sets, uncovered)]
    best = min(c.uncovered_fraction for c in candidates)
    per_count: dict[int, AnchorCandidate] = {}
    for c in candidates:
        current = per_count.get(c.per_location)
        if current is None or c.uncovered_fraction < current.uncovered_fraction:
            per_count[c.per_location] = c
    trade_off = [per_count[k] for k in sorted(per_count)]
    chosen = next(c for c in trade_off if c.uncovered_fraction <= best + tolerance)
    return _refine_levels(chosen, boxes, strides, fg_iou_threshold, offset), trade_off


def _refine_levels(candidate: AnchorCandidate, boxes: torch.Tensor, strides: list[int], fg_iou_threshold: float,
                   offset: float) -> AnchorCandidate:
    """Coordinate descent on each level's size multiplier (2^(k/6), |k| <= 3)."""
    sizes = [list(level) for level in candidate.sizes]

    def score(s):
        return float((best_iou_on_grid(boxes, s, candidate.aspect_ratios, strides, offset)
                      < fg_iou_threshold).float().mean())

    current = score(sizes)
    for level in range(len(sizes)):
        for k in (-3, -2, -1, 1, 2, 3):
            trial = [list(l) for l in sizes]
            trial[level] = [round(v * 2 ** (k / 6), 2) for v in sizes[level]]
            value = score(trial)
            if value < current - 1e-9:
                sizes, current = trial, value
    return AnchorCandidate(sizes, candidate.aspect_ratios, current, candidate.input_scale)
