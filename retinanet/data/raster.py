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

A damaged file is refused, never read as pixels: GDAL's PNG and JPEG drivers decode
sequentially, so a PNG's chunk stream (CRCs up to IEND) and a JPEG's end marker are checked at
open, a cheap pass over the bytes; any block GDAL fails to decode (a TIFF strip or tile cut
short) raises `ImageReadError` naming the file. Data that is not 8-bit is scaled to 0-255 by
`value_range.automatic_scaling` (or a range the caller gives), said in one log line per file.
"""

from __future__ import annotations

import logging
import mmap
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..allocator import return_freed_memory
from .image_io import ImageReadError, read_image
from .value_range import ValueScaling, automatic_scaling, check_value_range

log = logging.getLogger(__name__)

WINDOWED_MIN_PIXELS = 64_000_000  # JPEG/PNG above this are read by windows when rasterio is installed
GDAL_CACHE_MB = 64  # GDAL's block cache; bounds the memory of windowed reads
TIFF_SUFFIXES = {".tif", ".tiff", ".gtif", ".gtiff"}
_GEOKEY_TAG = 34735  # GeoTIFF's GeoKeyDirectory: the file is georeferenced
SAMPLE_GRID = 8  # the value range of a file without overviews is taken from up to 8 x 8 windows
SAMPLE_MIN_SIDE = 256  # of at least this many pixels a side
# GDAL settings for every windowed read. GDAL's PNG driver has a whole-image fast path that
# returns a truncated file's missing rows as whatever memory held, without an error; with it
# off, every row goes through libpng, which fails on a short file. libjpeg's "premature end"
# warning is kept an error whatever the environment says.
_GDAL_OPTIONS = {"GDAL_CACHEMAX": GDAL_CACHE_MB, "GDAL_PNG_WHOLE_IMAGE_OPTIM": "NO",
                 "GDAL_ERROR_ON_LIBJPEG_WARNING": "TRUE"}


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
    three are RGB; a palette band goes through its colour map; other data than 8-bit is scaled
    to 0-255 by `value_range` (`[low, high]`), else by the data's own range
    (`value_range.automatic_scaling` over the band's declared NBITS, or a sample of its valid
    values: the smallest overview, else `SAMPLE_GRID` x `SAMPLE_GRID` windows)."""

    def __init__(self, path: Path, value_range: tuple[float, float] | list[float] | None = None):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        self.path = path
        return_freed_memory()  # tile-sized buffers must not fragment the heap (see allocator)
        self._env = rasterio.Env(**_GDAL_OPTIONS)
        self._env.__enter__()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dataset = rasterio.open(path)
        except RasterioIOError as err:
            self._env.__exit__(None, None, None)
            raise ImageReadError(path, f"cannot be read ({_gdal_text(err)})") from None
        try:
            self._setup(check_value_range(value_range))
        except BaseException:
            self.close()
            raise

    def _setup(self, value_range: tuple[float, float] | None) -> None:
        ds = self._dataset
        _check_complete(self.path, ds.driver)
        self.width, self.height = ds.width, ds.height
        if ds.crs is not None or not ds.transform.is_identity:
            self.crs, self.transform = ds.crs, ds.transform
        self._bands = [1, 2, 3] if ds.count >= 3 else [1, 1, 1]
        self._nodata = ds.nodatavals[0]
        self._palette = None
        if ds.count < 3 and ds.colorinterp[0].name == "palette":
            table = np.zeros((256, 3), dtype=np.uint8)
            for index, rgba in ds.colormap(1).items():
                table[index] = rgba[:3]
            self._palette = table
        self._nbits = int(ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS", 0)) or None  # e.g. 12; 1 for bilevel
        self.scaling: ValueScaling | None = None
        if self._palette is None and (ds.dtypes[0] != "uint8" or (self._nbits or 8) < 8 or value_range is not None):
            self.scaling = _cached_scaling(self.path, value_range, self._find_scaling)

    def _find_scaling(self, value_range: tuple[float, float] | None) -> ValueScaling:
        if value_range is not None:
            return ValueScaling(*value_range, "the range given")
        if self._nbits:
            return automatic_scaling(self._dataset.dtypes[0], np.zeros(0), self._nbits)
        sample = self._sample()
        return automatic_scaling(self._dataset.dtypes[0], sample[~self._invalid(sample)])

    def _sample(self) -> np.ndarray:
        """Values from all over the image at a bounded cost: the smallest overview if the file
        has overviews, else up to `SAMPLE_GRID`^2 block-aligned windows spread evenly."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        ds = self._dataset
        if ds.overviews(1):
            factor = ds.overviews(1)[-1]
            shape = (len(set(self._bands)), -(-self.height // factor), -(-self.width // factor))
            return self._read(out_shape=shape, resampling=Resampling.nearest)
        block_h, block_w = ds.block_shapes[0]
        side_h = min(self.height, -(-SAMPLE_MIN_SIDE // block_h) * block_h)
        side_w = min(self.width, -(-SAMPLE_MIN_SIDE // block_w) * block_w)
        rows = _spread(self.height, side_h, block_h)
        cols = _spread(self.width, side_w, block_w)
        windows = [Window(x, y, min(side_w, self.width - x), min(side_h, self.height - y)) for y in rows for x in cols]
        return np.concatenate([self._read(window=w).reshape(len(self._bands), -1) for w in windows], axis=1)

    def _invalid(self, data: np.ndarray) -> np.ndarray:
        """Pixels equal to the band's nodata value (NaN included), as a mask like `data`."""
        if self._nodata is None:
            return np.zeros(data.shape, dtype=bool)
        if np.isnan(self._nodata):
            return np.isnan(data)
        return data == self._nodata

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
            raise ImageReadError(self.path, f"damaged or truncated image ({_gdal_text(err)})") from None
        return data[[unique.index(b) for b in self._bands]]

    def _to_rgb(self, data: np.ndarray) -> torch.Tensor:
        if self._palette is not None:
            data = self._palette[data[0]].transpose(2, 0, 1)
        elif self.scaling is not None:
            data = self.scaling.apply(data, self._invalid(data) if self._nodata is not None else None)
        return torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8))

    def close(self):
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
            self._env.__exit__(None, None, None)


def _gdal_text(err: Exception) -> str:
    """GDAL's own first line for a rasterio error (rasterio's text only points to it), without
    libjpeg's hint to turn the error into a warning."""
    text = str(err.__cause__ or err).splitlines()[0] if str(err.__cause__ or err) else type(err).__name__
    return re.sub(r" \(this error can be turned as a warning[^)]*\)", "", text)


def _check_complete(path: Path, driver: str) -> None:
    """Refuse a PNG or JPEG whose stream stops short (GDAL's drivers for them decode
    sequentially and would only meet the damage at the rows it hides). One pass over the bytes,
    nothing decoded: a PNG's chunks, CRCs and IEND (Pillow's `verify`), a JPEG's end-of-image
    marker after its first scan."""
    if driver == "PNG":
        problem = _png_problem(path)
    elif driver == "JPEG":
        problem = _jpeg_problem(path)
    else:
        return
    if problem:
        raise ImageReadError(path, f"damaged or truncated image ({problem})")


def _png_problem(path: Path) -> str | None:
    from PIL import ImageFile

    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # verify decodes nothing
            try:
                with Image.open(path) as image:
                    image.verify()
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except (OSError, SyntaxError, ValueError) as err:
        return str(err) or type(err).__name__
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
    return None


def _jpeg_problem(path: Path) -> str | None:
    """None when the marker segments lead to a scan and an end-of-image marker follows it."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = 2  # after SOI
        while position + 4 <= len(data):
            if data[position] != 0xFF:
                return f"no JPEG marker at byte {position}"
            marker = data[position + 1]
            if marker == 0xFF:  # fill byte
                position += 1
            elif marker == 0xDA:  # start of scan: entropy-coded data until the end-of-image marker
                return None if data.rfind(b"\xff\xd9", position) > position else "no end-of-image marker"
            elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
                position += 2
            else:
                position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return "the file ends before the image data"


def _spread(size: int, side: int, block: int) -> list[int]:
    """Up to SAMPLE_GRID window starts, block-aligned, spread evenly over `size`."""
    count = min(SAMPLE_GRID, max(1, -(-size // side)))
    if count == 1:
        return [0]
    return sorted({(i * (size - side) // (count - 1)) // block * block for i in range(count)})


_SCALINGS: dict[tuple, ValueScaling] = {}  # (path, size, mtime, value_range) -> the scaling found
_SCALINGS_MAX = 4096


def _cached_scaling(path: Path, value_range, find) -> ValueScaling:
    """`find(value_range)` once per file version in this process, logged once: the tiles of an
    image are read by many opens of it (tiled training reopens it as items interleave)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, value_range)
    if key not in _SCALINGS:
        if len(_SCALINGS) >= _SCALINGS_MAX:
            _SCALINGS.clear()
        _SCALINGS[key] = scaling = find(value_range)
        log.info("%s: %s; set data.value_range (predict --value-range LOW,HIGH) to change it",
                 path, scaling.describe())
    return _SCALINGS[key]


def rasterio_available() -> bool:
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def open_raster(path: str | Path, windowed: bool | None = None,
                value_range: tuple[float, float] | list[float] | None = None) -> Raster:
    """Open `path` for reading by windows where that pays (see the module docstring), else
    decode it whole. `windowed` forces the choice (True needs rasterio). `value_range`
    (`[low, high]`; None or empty: automatic) maps data that is not 8-bit to 0-255 when read by
    windows. Raises `ImageReadError` naming the file, ValueError for a bad `value_range`."""
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
        return WindowedRaster(path, value_range)
    raster = ArrayRaster(read_image(path))
    raster.georeferenced_without_reader = path.suffix.lower() in TIFF_SUFFIXES and _has_geokeys(path)
    return raster


def _worth_windows(path: Path) -> bool:
    """TIFFs, and images over WINDOWED_MIN_PIXELS whose EXIF does not rotate them (a PNG's
    EXIF is looked for before its image data only: Pillow decodes the whole PNG to find it later)."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # header only: no decode
            try:
                with Image.open(path) as image:
                    large = image.width * image.height > WINDOWED_MIN_PIXELS
                    exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
                    rotated = exif.get(0x0112, 1) not in (1, None)
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

