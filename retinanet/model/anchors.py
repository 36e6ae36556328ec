"""Anchor boxes for every pyramid level, in (x0, y0, x1, y1) input-image pixels."""

from __future__ import annotations

import math

import torch
from torch import nn


def cell_anchors(sizes: list[float], aspect_ratios: list[float], round_to_int: bool = False) -> torch.Tensor:
    """The anchors of one location centred at (0, 0): `(len(sizes) * len(aspect_ratios), 4)`.

    Size-major order (all ratios of the first size, then the next size). `aspect_ratio` is
    height / width and every anchor of a size has area `size**2`.
    """
    rows = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2, -h / 2, w / 2, h / 2])
    anchors = torch.tensor(rows, dtype=torch.float64)
    return (anchors.round() if round_to_int else anchors).to(torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors on the grid of each level.

    `forward(feature_sizes, image_size)` takes the `(H, W)` of each level and the padded
    input size, and returns one `(H*W*A, 4)` tensor per level, ordered location-major
    (row, then column) and anchor-minor, which is how the head flattens its outputs.
    Grids are cached per (sizes, device).

    Args:
        sizes: anchor sizes per level, e.g. `[[32, 40.3, 50.8], [64, ...], ...]`.
        aspect_ratios: height / width ratios, shared by all levels.
        strides: pixel stride of each level.
        offset: anchor centres at `(index + offset) * stride`.
        round_to_int: round the per-location templates to integers (torchvision).
        stride_from_image_size: use `image size // feature size` as stride (torchvision),
            instead of the nominal stride.
    """

    def __init__(self, sizes: list[list[float]], aspect_ratios: list[float], strides: list[int], *,
                 offset: float = 0.0, round_to_int: bool = False, stride_from_image_size: bool = False):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size lists for {len(strides)} strides")
        self.strides = list(strides)
        self.offset = offset
        self.stride_from_image_size = stride_from_image_size
        self.cells = [cell_anchors(s, aspect_ratios, round_to_int) for s in sizes]
        self.num_anchors = len(self.cells[0])
        if any(len(c) != self.num_anchors for c in self.cells):
            raise ValueError("every level needs the same number of anchors per location")
        self._cache: dict[tuple, list[torch.Tensor]] = {}

    def forward(self, feature_sizes: list[tuple[int, int]], image_size: tuple[int, int],
                device: torch.device | None = None) -> list[torch.Tensor]:
        strides = self.level_strides(feature_sizes, image_size)
        key = (tuple(map(tuple, feature_sizes)), tuple(strides), str(device))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = self.grids(feature_sizes, strides, device)
        return self._cache[key]

    def level_strides(self, feature_sizes, image_size) -> list[tuple]:
        """Each level's `(stride_y, stride_x)`: nominal, or `image size // feature size`. Sizes
        may be ints or 0-dim tensors (inside an exported graph, where they vary)."""
        if not self.stride_from_image_size:
            return [(s, s) for s in self.strides]
        return [(image_size[0] // h, image_size[1] // w) for h, w in feature_sizes]

    def grids(self, feature_sizes, strides, device: torch.device | None = None) -> list[torch.Tensor]:
        """The anchors of every level, uncached (`forward` caches them)."""
        return [self._grid(cell.to(device), size, stride) for cell, size, stride in zip(self.cells, feature_sizes,
                                                                                       strides)]

    def _grid(self, cell: torch.Tensor, size: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
        h, w = size
        ys = (torch.arange(h, dtype=torch.float32, device=cell.device) + self.offset) * stride[0]
        xs = (torch.arange(w, dtype=torch.float32, device=cell.device) + self.offset) * stride[1]
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([x, y, x, y], dim=-1).reshape(-1, 1, 4)
        return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)
