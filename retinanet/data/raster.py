"""Large images read by windows, so that memory does not grow with the image.

`open_raster(path)` gives a `Raster`: its `width`/`height`, `read(window)` for one
`(x0, y0, x1, y1)` window as an RGB `(3, h, w)` uint8 tensor, `read_scaled(max_side)` for an
overview, and, for a georeferenced file, its `crs` and `transform` (pixel -> map coordinates).

With the `[geo]` extra (rasterio, i.e. GDAL) TIFF and GeoTIFF files, and any other image
over `WINDOWED_MIN_PIXELS`, are read window by window through a bounded block cache: a
20,000 x 20,000 image costs the windows in flight, not 1.2 GB. Pillow's decompression-bomb
limit does not apply there, since the image is never held whole. Without rasterio, or for
JPEGs whose EXIF orientation rotates them (GDAL ignores EXIF), the image is decoded whole by
`read_image`, with its limit (`retinanet predict --max-pixels` raises it).
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_io import ImageReadError, read_image

WINDOWED_MIN_PIXELS = 64_000_000  # JPEG/PNG above this are read by windows when rasterio is installed
GDAL_CACHE_MB = 64  # GDAL's block cache; bounds the memory of windowed reads
TIFF_SUFFIXES = {".tif", ".tiff", ".gtif", ".gtiff"}
_GEOKEY_TAG = 34735  # GeoTIFF's GeoKeyDirectory: the file is georeferenced


class Raster:
    """An image opened for windowed reading (use as a context manager)."""

    width: int
    height: int
    crs = None  # rasterio CRS of a georeferenced file, else None
    transform = None  # affine pixel -> CRS coordinates (rasterio's `Affine`), else None
    georeferenced_without_reader = False  # a GeoTIFF read by Pillow: georeference lost

    def read(self, window: tuple[int, int, int, int]) -> torch.Tensor:
        raise NotImplementedError

    def read_scaled(self, max_side: int) -> torch.Tensor:
        """The whole image shrunk to at most `max_side` px a side (never enlarged)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Raster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArrayRaster(Raster):
    """An image already in memory, `(3, H, W)` uint8; windows are views of it."""

    def __init__(self, image: torch.Tensor):
        self.image = image
        self.height, self.width = image.shape[-2:]

    def read(self, window):
        x0, y0, x1, y1 = window
        return self.image[:, y0:y1, x0:x1]

    def read_scaled(self, max_side):
        scale = min(1.0, max_side / max(self.height, self.width))
        if scale == 1.0:
            return self.image
        size = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        small = torch.nn.functional.interpolate(self.image[None].float(), size=size, mode="area")[0]
        return small.round().clamp(0, 255).to(torch.uint8)


class WindowedRaster(Raster):
    """A file read window by window through rasterio (GDAL). One band is grey; the first
    three are RGB; a palette band goes through its colour map; 16-bit and other non-8-bit
    data is scaled as `read_image` scales it (`_scale_top`)."""

    def __init__(self, path: Path):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.path = path
        _return_large_buffers_to_the_os()
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self._env.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dataset = rasterio.open(path)
        except RasterioIOError as err:
            self._env.__exit__(None, None, None)
            raise ImageReadError(path, f"cannot be read ({str(err).splitlines()[0]})") from None
        ds = self._dataset
        self.width, self.height = ds.width, ds.height
        if ds.crs is not None or not ds.transform.is_identity:
            self.crs, self.transform = ds.crs, ds.transform
        self._bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
        self._palette = None
        if ds.count < 3 and ds.colorinterp[0].name == "palette":
            table = np.zeros((256, 3), dtype=np.uint8)
            for index, rgba in ds.colormap(1).items():
                table[index] = rgba[:3]
            self._palette = table
        self._top = self._scale_top(ds.dtypes[0])

    def _scale_top(self, dtype: str) -> float | None:
        """The value that maps to 255, by `read_image`'s rule: 65535 for 16-bit data; for
        other integers 65535 when a value exceeds 255 (one pass by blocks), else 255."""
        if dtype == "uint8":
            return None
        if dtype in ("uint16", "int16"):
            return 65535.0
        if dtype.startswith("float"):
            return 255.0  # clipped to [0, 255] like read_image's float images
        for _, window in self._dataset.block_windows(1):
            if int(self._dataset.read(sorted(set(self._bands)), window=window).max()) > 255:
                return 65535.0
        return 255.0

    def read(self, window):
        from rasterio.windows import Window

        x0, y0, x1, y1 = window
        return self._to_rgb(self._read(window=Window(x0, y0, x1 - x0, y1 - y0)))

    def read_scaled(self, max_side):
        from rasterio.enums import Resampling

        scale = min(1.0, max_side / max(self.height, self.width))
        shape = (max(1, round(self.height * scale)), max(1, round(self.width * scale)))
        # GDAL reads the overview it needs (or decimates): memory is the output's
        data = self._read(out_shape=(len(set(self._bands)), *shape), resampling=Resampling.average
                          if self._palette is None else Resampling.nearest)
        return self._to_rgb(data)

    def _read(self, **kwargs) -> np.ndarray:
        from rasterio.errors import RasterioError

        unique = sorted(set(self._bands))
        try:
            data = self._dataset.read(unique, **kwargs)
        except (RasterioError, OSError) as err:  # GDAL failed to decode a block: a damaged file
            gdal_says = str(err.__cause__ or err).splitlines()[0]  # rasterio's own text only points to it
            raise ImageReadError(self.path, f"damaged or truncated image ({gdal_says})") from None
        return data[[unique.index(b) for b in self._bands]]

    def _to_rgb(self, data: np.ndarray) -> torch.Tensor:
        if self._palette is not None:
            data = self._palette[data[0]].transpose(2, 0, 1)
        elif self._top is not None:
            data = np.clip(data.astype(np.float64) / self._top * 255.0 + (0.5 if self._top > 255 else 0.0), 0, 255)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))

    def close(self):
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
            self._env.__exit__(None, None, None)


_HEAP_BOUNDED = False


def _return_large_buffers_to_the_os() -> None:
    """Serve allocations of 1 MiB and more by mmap, returned to the OS when freed (glibc).

    glibc otherwise raises its mmap threshold after the first large free and serves the
    tile-sized buffers of a tiled pass from the heap, which fragments: tiled prediction over a
    very large GeoTIFF could then grow by gigabytes, where with the threshold fixed it stays
    flat (figures in benchmarks/RESULTS.md)."""
    global _HEAP_BOUNDED
    if _HEAP_BOUNDED or not sys.platform.startswith("linux"):
        return
    _HEAP_BOUNDED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also stops glibc adjusting it
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def rasterio_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def open_raster(path: str | Path, windowed: bool | None = None) -> Raster:
    """Open `path` for reading by windows where that pays (see the module docstring), else
    decode it whole. `windowed` forces the choice (True needs rasterio). Raises
    `ImageReadError` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError(path, "is a folder, not an image file")
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if windowed is None:
        windowed = rasterio_available() and _worth_windows(path)
    if windowed:
        if not rasterio_available():
            raise ImageReadError(path, "reading by windows needs rasterio: pip install 'retinanet[geo]'")
        return WindowedRaster(path)
    raster = ArrayRaster(read_image(path))
    raster.georeferenced_without_reader = path.suffix.lower() in TIFF_SUFFIXES and _has_geokeys(path)
    return raster


def _worth_windows(path: Path) -> bool:
    """TIFFs, and images over WINDOWED_MIN_PIXELS whose EXIF does not rotate them."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # header only: no decode
            try:
                with Image.open(path) as image:
                    large = image.width * image.height > WINDOWED_MIN_PIXELS
                    rotated = image.getexif().get(0x0112, 1) not in (1, None)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (OSError, SyntaxError, ValueError):
        return True  # not for Pillow: perhaps for GDAL (it names the problem otherwise)
    return large and not rotated


def _has_geokeys(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return _GEOKEY_TAG in getattr(image, "tag_v2", {})
    except (OSError, SyntaxError, ValueError):
        return False


def pixel_to_crs(boxes: torch.Tensor, transform) -> list[list[tuple[float, float]]]:
    """Each `(x0, y0, x1, y1)` pixel box as a closed ring of map coordinates (the four
    corners through the affine `transform`; a rotated raster gives a parallelogram)."""
    a, b, c, d, e, f = tuple(transform)[:6]
    rings = []
    for x0, y0, x1, y1 in boxes.tolist():
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
        rings.append([(a * x + b * y + c, d * x + e * y + f) for x, y in corners])
    return rings


def crs_name(crs) -> str:
    """A CRS as GeoJSON's (2008) named-CRS string: an EPSG URN when it has a code, else WKT."""
    code = crs.to_epsg() if crs is not None else None
    return f"urn:ogc:def:crs:EPSG::{code}" if code else crs.to_wkt()

