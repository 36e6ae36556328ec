"""Images in, the network's input batch out: normalise, resize, pad; and boxes back out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ImageBatch:
    """`tensor (B, 3, H, W)` padded; `image_sizes` `(h, w)` after resizing, before padding;
    `original_sizes` `(h, w)` as given."""

    tensor: torch.Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]


class Preprocessor(nn.Module):
    """Normalises, resizes (short side to `min_size`, long side at most `max_size`) and pads
    images to a multiple of `size_divisibility`, scaling target boxes alike.

    Input images are RGB `(3, H, W)` tensors, uint8 in [0, 255] or float in [0, 1].
    `pixel_mean`/`pixel_std` are in the `pixel_scale` range (1.0 or 255.0) and in
    `channel_order`; they are buffers (not saved in checkpoints: the config holds them), so
    they move with the model to its device.
    """

    def __init__(self, train_min_sizes: list[int], test_min_size: int, max_size: int,
                 pixel_mean: list[float], pixel_std: list[float], *, pixel_scale: float = 1.0,
                 channel_order: str = "RGB", size_divisibility: int = 32, resize: bool = True):
        super().__init__()
        if channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {channel_order!r}")
        self.train_min_sizes = list(train_min_sizes)
        self.test_min_size = test_min_size
        self.max_size = max_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1),
                             persistent=False)
        self.pixel_scale = pixel_scale
        self.bgr = channel_order == "BGR"
        self.size_divisibility = size_divisibility
        self.resize = resize

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None, training: bool = False,
                 generator: torch.Generator | None = None) -> tuple[ImageBatch, list[dict] | None]:
        """In training, each image's short side is drawn from `train_min_sizes` with
        `generator` (torch's default generator when None)."""
        if not images:
            raise ValueError("no images to process (empty batch)")
        originals, min_sizes = [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
            originals.append((int(image.shape[-2]), int(image.shape[-1])))
            if self.resize:
                min_sizes.append(self.draw_min_size(generator) if training else self.test_min_size)
                self.check_size(originals[-1], min_sizes[-1], f"image {i}")
        out_images = self.normalize_and_resize(images, min_sizes)
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in out_images]
        out_targets = None
        if targets is not None:
            out_targets = [dict(target, boxes=scale_boxes(target["boxes"], original, size))
                           for target, original, size in zip(targets, originals, sizes)]
        return ImageBatch(self.pad(out_images), sizes, originals), out_targets

    def normalize_and_resize(self, images: list[torch.Tensor], min_sizes: list[int]) -> list[torch.Tensor]:
        """Images of the same shape, type, device and target size go through as one batch (a
        batch of 32 photos: a handful of kernel launches instead of ~200); the same numbers as
        one at a time."""
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            key = (tuple(image.shape), image.dtype, image.device, min_sizes[i] if self.resize else None)
            groups.setdefault(key, []).append(i)
        out: list[torch.Tensor] = [images[0]] * len(images)
        for key, members in groups.items():
            stacked = torch.stack([images[i] for i in members]) if len(members) > 1 else images[members[0]][None]
            stacked = self.normalize(stacked)
            if self.resize:
                stacked = self.resize_images(stacked, min_sizes[members[0]])
            for i, image in zip(members, stacked):
                out[i] = image
        return out

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:
            image = image.float() if self.pixel_scale == 255.0 else image.float() * (self.pixel_scale / 255.0)
        elif self.pixel_scale != 1.0:
            image = image.float() * self.pixel_scale
        if self.bgr:
            image = image.flip(-3)
        return (image - self.pixel_mean) / self.pixel_std

    def draw_min_size(self, generator: torch.Generator | None) -> int:
        if len(self.train_min_sizes) == 1:
            return self.train_min_sizes[0]
        index = int(torch.randint(len(self.train_min_sizes), (1,), generator=generator))
        return self.train_min_sizes[index]

    def scale_factor(self, size: tuple[int, int], min_size: int) -> float:
        """The resize factor for an image of `size (h, w)` (computed in float32 like torchvision)."""
        return resize_scale(torch.tensor(size, dtype=torch.float32), min_size, self.max_size).item()

    def check_size(self, size: tuple[int, int], min_size: int | None = None, name: str = "image") -> None:
        """Raise `ValueError` for an image so elongated that resizing leaves a side of 0 pixels."""
        if not self.resize:
            return
        scale = self.scale_factor(size, self.test_min_size if min_size is None else min_size)
        if min(math.floor(size[0] * scale), math.floor(size[1] * scale)) < 1:
            raise ValueError(f"{name}: {size[1]}x{size[0]} px is too elongated for an input of at most "
                             f"{self.max_size} px (a side would be 0 px after resizing); crop or tile it")

    def resize_images(self, images: torch.Tensor, min_size: int) -> torch.Tensor:
        """Bilinear resize of `(N, 3, H, W)` images by one scale factor; none where that leaves
        the size as it is (bilinear weights are then exactly 1 and 0)."""
        size = tuple(images.shape[-2:])
        scale = self.scale_factor(size, min_size)
        if all(math.floor(side * scale) == side for side in size):
            return images
        return F.interpolate(images, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                             align_corners=False)

    def pad(self, images: list[torch.Tensor]) -> torch.Tensor:
        d = self.size_divisibility
        h = max(im.shape[-2] for im in images)
        w = max(im.shape[-1] for im in images)
        if d > 1:
            h, w = int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)
        batch = images[0].new_zeros((len(images), 3, h, w))
        for out, im in zip(batch, images):
            out[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch


def resize_scale(size: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """The resize factor, a float32 0-dim tensor, of an image of `size`, a float32 `(h, w)`
    tensor: short side to `min_size`, long side at most `max_size`. A function of tensors, so
    that an exported graph computes it from its input's shape with the same float32 ops."""
    return torch.minimum(min_size / size.min(), max_size / size.max())


def scale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """Scale `(N, 4)` xyxy boxes from an image of `from_size (h, w)` to one of `to_size`.

    The ratios are applied as scalars: a ratio tensor would be copied to the boxes' device,
    and on a GPU such a copy waits for it."""
    ratio_h, ratio_w = scale_ratios(from_size, to_size)
    scaled = boxes.clone() if boxes.is_floating_point() else boxes.to(torch.float32)
    scaled[..., 0::2] *= ratio_w
    scaled[..., 1::2] *= ratio_h
    return scaled


def scale_ratios(from_size: tuple[int, int], to_size: tuple[int, int]) -> tuple[float, float]:
    """`(h, w)` ratios from an image of `from_size (h, w)` to one of `to_size`, computed in
    float32 as torchvision computes them."""
    return tuple(float(torch.tensor(t, dtype=torch.float32) / torch.tensor(f, dtype=torch.float32))
                 for f, t in zip(from_size, to_size))
