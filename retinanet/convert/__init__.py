"""Converters from other libraries' RetinaNet weights to our checkpoints."""

from __future__ import annotations

from pathlib import Path

from ..model.checkpoint import write_checkpoint
from ..model.config import ModelConfig, config_to_dict
from .common import ConversionError
from .safe_pickle import load_pickle, load_torch_state

SOURCES = ("torchvision", "detectron2", "paddle")


def convert_state(source: str, state: dict, num_classes: int | None = None):
    """`(ModelConfig, state dict)` from a source library's loaded weights."""
    if source == "torchvision":
        from .torchvision import convert_torchvision

        return convert_torchvision(state, num_classes)
    if source == "detectron2":
        from .detectron2 import convert_detectron2

        return convert_detectron2(state, num_classes)
    if source == "paddle":
        from .paddle import convert_paddle

        return convert_paddle(state, num_classes)
    raise ConversionError(f"unknown source {source!r} (choose from {SOURCES})")


def read_source(source: str, path: str | Path, trust: bool = False) -> dict:
    """Load a source file without running code in it (unless `trust`)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    if source == "torchvision" or path.suffix in (".pth", ".pt"):
        state = load_torch_state(path, trust)
    else:
        state = load_pickle(path, trust)
    if source == "detectron2" and isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConversionError(f"{path}: holds no weights dictionary")
    return state


def convert_file(source: str, src: str | Path, dst: str | Path, num_classes: int | None = None,
                 trust: bool = False) -> ModelConfig:
    state = read_source(source, src, trust)
    try:
        config, weights = convert_state(source, state, num_classes)
    except ConversionError as err:
        raise ConversionError(f"{src}: {err}") from None
    write_checkpoint(dst, {"config": {"model": config_to_dict(config)}, "model": weights,
                           "converted_from": {"source": source, "file": str(src)}})
    return config
