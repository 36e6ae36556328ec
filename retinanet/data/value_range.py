"""Pixel values of any data type mapped to 0-255: by a range the user gives, or by the data's own.

Images that are not 8-bit (16-bit, 12-bit stored in 16, float reflectance in 0-1, elevation in
metres) carry no rule for what is black and what is white. `automatic_scaling` derives one from
the data: a declared bit depth (GDAL's NBITS), else the values themselves (a sample of them for
large rasters), and says which in `ValueScaling.reason`, for the one log line a reader prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ValueScaling:
    """`low` maps to 0 and `high` to 255, linearly, clipped; `reason` says where they came from."""

    low: float
    high: float
    reason: str

    def apply(self, data: np.ndarray, invalid: np.ndarray | None = None) -> np.ndarray:
        """`data` as uint8 (rounded); NaN and the `invalid` (nodata) pixels become 0."""
        scaled = (data.astype(np.float64) - self.low) * (255.0 / (self.high - self.low)) + 0.5
        scaled = np.nan_to_num(scaled, nan=0.0)
        if invalid is not None:
            scaled[invalid] = 0.0
        return np.clip(scaled, 0, 255).astype(np.uint8)

    def describe(self) -> str:
        return f"values {self.low:g}-{self.high:g} scaled to 0-255 ({self.reason})"


def check_value_range(value_range) -> tuple[float, float] | None:
    """`[]`/None (automatic) or `[low, high]` with finite low < high, as a tuple; else ValueError."""
    if value_range is None or len(value_range) == 0:
        return None
    if len(value_range) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) for v in value_range):
        raise ValueError(f"value range {list(value_range)!r} must be two finite numbers [low, high]")
    low, high = float(value_range[0]), float(value_range[1])
    if not low < high:
        raise ValueError(f"value range [{low:g}, {high:g}]: low must be below high")
    return low, high


def automatic_scaling(dtype: np.dtype | str, values: np.ndarray, nbits: int | None = None) -> ValueScaling:
    """The range of data of `dtype` whose valid values (nodata left out) are, or sample, `values`.

    Integers: 0 to 2**bits - 1, with `bits` the declared `nbits` or else the fewest (at least 8)
    that hold the largest value, so 12-bit data in uint16 spans 0-4095 and 0-255 data stays as it
    is (negative values, if any, widen the range down to the smallest). Floats: 0-1 when every
    value lies within it, 0-255 when they are whole numbers within that, else their min-max."""
    dtype = np.dtype(dtype)
    if nbits and np.issubdtype(dtype, np.integer):
        return ValueScaling(0.0, float(2**nbits - 1), f"declared {nbits}-bit data")
    values = values[np.isfinite(values)] if np.issubdtype(dtype, np.floating) else values
    if values.size == 0:
        return ValueScaling(0.0, 255.0, "no valid values found")
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(dtype, np.integer):
        bits = max(8, int(high).bit_length())
        return ValueScaling(min(0.0, low), float(2**bits - 1), f"{bits}-bit data: largest value {high:g}")
    if low >= 0 and high <= 1:
        return ValueScaling(0.0, 1.0, "floating-point values within 0-1")
    if low >= 0 and high <= 255 and bool(np.all(values == np.round(values))):
        return ValueScaling(0.0, 255.0, "floating-point whole numbers within 0-255")
    if low == high:
        return ValueScaling(low - 0.5, high + 0.5, "a single floating-point value")
    return ValueScaling(low, high, "the floating-point data's minimum and maximum")
