"""The checkpoint file format: a `torch.save`d dict of tensors and plain data.

`{"format": "retinanet-checkpoint", "version": 1, "config": {...}, "model": state_dict, ...}`
plus optional training state. Everything in it loads with `weights_only=True`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "retinanet-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, unsafe or not ours; the message names it."""


def write_checkpoint(path: str | Path, data: dict) -> Path:
    """Save atomically: write a temporary file beside `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **data}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True` (no code can run), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # damaged zip, truncated file, forbidden pickle content
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint (damaged, truncated, or it holds objects that "
            f"a weights-only load refuses): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or "model" not in data:
        raise CheckpointError(
            f"{path}: not a retinanet checkpoint (to use weights from torchvision, detectron2 or "
            f"PaddleDetection, convert them first: retinanet convert --help)"
        )
    return data
