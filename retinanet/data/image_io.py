"""Decoding images into RGB uint8 tensors, with errors that name the file and the problem.
Torch is imported only where a tensor is returned: `read_rgb` and `decode_rgb` run without it."""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .value_range import automatic_scaling

log = logging.getLogger(__name__)
_SCALINGS_SAID: set[str] = set()  # the scaling rules already logged by this process

if TYPE_CHECKING:
    import torch


class ImageReadError(OSError):
    """An image could not be read; `str()` is one line naming the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


class ImageTooLargeError(ImageReadError):
    """An image has more pixels than the reader's budget (`max_pixels`); known from its header,
    before any pixel is decoded. `pixels` and `limit` are counts; `size` is `(w, h)` where the
    header could be read."""

    def __init__(self, path: str | Path, pixels: int, limit: int, size: tuple[int, int] | None = None):
        self.pixels, self.limit, self.size = pixels, limit, size
        shown = f"{size[0]}x{size[1]} = {pixels:,} pixels" if size else f"{pixels:,} pixels"
        super().__init__(path, f"{shown} is over the limit of {limit:,} pixels")


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image file as an RGB `(3, H, W)` uint8 tensor.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images become
    8-bit RGB. A missing, truncated or non-image file, a folder, or an image larger than
    Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 179 megapixels;
    `retinanet predict --max-pixels` raises it) raises `ImageReadError`.
    """
    import torch

    return torch.from_numpy(read_rgb(path)).permute(2, 0, 1).contiguous()


def read_rgb(path: str | Path) -> np.ndarray:
    """`read_image` as an `(H, W, 3)` uint8 array, without torch."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    return decode_rgb(path, path)


def read_image_bytes(data: bytes, name: str = "upload", max_pixels: int | None = None) -> torch.Tensor:
    """`read_image` for an image held in memory (an upload); errors name it `name`. With
    `max_pixels`, an image of more pixels raises `ImageTooLargeError` from its header, before
    any pixel is decoded."""
    if not data:
        raise ImageReadError(name, "empty")
    import torch

    return torch.from_numpy(decode_rgb(io.BytesIO(data), name, max_pixels)).permute(2, 0, 1).contiguous()


def decode_rgb(source, name, max_pixels: int | None = None) -> np.ndarray:
    """Decode a file or file-like object fully as an `(H, W, 3)` uint8 RGB array, EXIF applied.
    With `max_pixels`, the header's size is checked first (`Image.open` reads only the header)
    and an image over it raises `ImageTooLargeError` with nothing decoded."""
    # Some libraries switch PIL to silently pad truncated files; a damaged image must fail here.
    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():  # sizes up to the limit are fine: no raw Pillow warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageTooLargeError(name, image.width * image.height, max_pixels, image.size)
                image.load()  # decode fully now: a truncated file fails here, not later
                image = ImageOps.exif_transpose(image)
                return to_rgb_array(image)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        if max_pixels is not None and found:
            raise ImageTooLargeError(name, int(found[1]), max_pixels) from None
        size = f"{int(found[1]):,} pixels" if found else "its size"
        raise ImageReadError(name, f"{size} is over Pillow's decompression-bomb limit of "
                                   f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels; if you trust the file, raise the "
                                   "limit (retinanet predict --max-pixels N)") from None
    except ImageTooLargeError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(name, f"damaged or truncated image ({err})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode as an `(H, W, 3)` uint8 array. Single-band images that are not 8-bit (16-bit,
    32-bit integer, float) are scaled by their data's range, by the same rule as images read
    by windows (`value_range.automatic_scaling`), and the rule used is logged once per kind."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image)
        scaling = automatic_scaling(array.dtype, array)
        if scaling.reason not in _SCALINGS_SAID:
            _SCALINGS_SAID.add(scaling.reason)
            log.info("%s-mode image: %s", image.mode, scaling.describe())
        return np.repeat(scaling.apply(array)[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return np.array(image, dtype=np.uint8)
