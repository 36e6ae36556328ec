"""Deterministic, resumable, distributed batch sampling for training."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from .augment import draw_ops, rotated_aspect_ratio


class TrainBatchSampler(Sampler):
    """An endless stream of batches of `(index, flip)` (with `max_zoom > 1`: `(index, flip,
    (zoom, fx, fy))`, see `zoom_crop`; with `augment`: `(index, flip, zoom or None, ops)`, see
    `augment.draw_ops`) for one process.

    The global batch order depends only on `seed`: every process draws the same global
    batches (shuffled each epoch, grouped by aspect ratio so that a batch is all landscape
    or all portrait) and takes its own contiguous slice. So N processes see together
    exactly what one process with the global batch sees, and `start_batch` resumes the
    stream at any point without loading an image.

    Args:
        aspect_ratios: width / height per dataset item.
        batch_size: the global batch; divisible by `world_size`.
        flip_prob: probability of a horizontal flip per sample.
        max_zoom: each sample is cropped to `1/zoom` of its sides, `zoom` uniform in
            `[1, max_zoom]`, at a uniform position (1: no crop, and the draws of before).
        augment: the ops of `data.augment`, in order; their draws follow all the others, so
            that an empty list leaves the stream as it was. An item turned by a quarter turn
            is grouped by its turned aspect ratio.
    """

    def __init__(self, aspect_ratios: list[float], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, grouping: bool = True, flip_prob: float = 0.0, start_batch: int = 0,
                 max_zoom: float = 1.0, augment: Sequence = ()):
        if max_zoom < 1:
            raise ValueError(f"max_zoom {max_zoom} is below 1 (1: no zoom)")
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} is not divisible by {world_size} processes")
        if not aspect_ratios:
            raise ValueError("cannot sample from an empty dataset")
        self.aspect_ratios, self.grouping = list(aspect_ratios), grouping
        self.groups = [int(r >= 1.0) if grouping else 0 for r in aspect_ratios]
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.flip_prob, self.max_zoom = flip_prob, max_zoom
        self.start_batch = start_batch
        self.augment = list(augment)

    def __iter__(self) -> Iterator[list[tuple]]:
        per_rank = self.batch_size // self.world_size
        lo = self.rank * per_rank
        for i, batch in enumerate(self.global_batches()):
            if i >= self.start_batch:
                yield batch[lo : lo + per_rank]

    def global_batches(self) -> Iterator[list[tuple]]:
        buffers: dict[int, list[tuple]] = {}
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            order = torch.randperm(len(self.groups), generator=generator).tolist()
            flips = (torch.rand(len(order), generator=generator) < self.flip_prob).tolist()
            items = [(index, flip) for index, flip in zip(order, flips)]
            if self.max_zoom > 1:
                draws = torch.rand(len(order), 3, generator=generator, dtype=torch.float64)
                draws[:, 0] = 1 + draws[:, 0] * (self.max_zoom - 1)
                items = [(index, flip, tuple(zoom)) for (index, flip), zoom in zip(items, draws.tolist())]
            if self.augment:
                items = [(*item[:2], item[2] if len(item) > 2 else None, ops)
                         for item, ops in zip(items, draw_ops(self.augment, len(order), generator))]
            for item in items:
                buffer = buffers.setdefault(self.group(item), [])
                buffer.append(item)
                if len(buffer) == self.batch_size:
                    yield list(buffer)
                    buffer.clear()
            epoch += 1

    def group(self, item: tuple) -> int:
        """The batch group of a drawn item: landscape or portrait after its quarter turns."""
        if not self.grouping or len(item) < 4:
            return self.groups[item[0]]
        return int(rotated_aspect_ratio(self.aspect_ratios[item[0]], item[3]) >= 1.0)

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2**62
