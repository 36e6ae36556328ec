"""Converters from other libraries' RetinaNet weights to our checkpoints."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import write_checkpoint
from ..model.config import ModelConfig
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
    state = _load_weight_file(path, trust, as_torch=source == "torchvision")
    return _weights_dict(state, path)


def read_detector(path: str | Path, trust: bool = False) -> tuple[str, dict]:
    """Load any detector file and say what it is, by its content, not its name:
    `("retinanet", content)` for one of our checkpoints (see `retinanet.checkpoint`), else
    `(source, weights dict)` with `source` one of `SOURCES`. No code in the file runs
    (unless `trust`); a file that is none of these raises `ConversionError`."""
    path = Path(path)
    content = _load_weight_file(path, trust, as_torch=False)
    from ..checkpoint import is_checkpoint_data

    if is_checkpoint_data(content):
        return "retinanet", content
    state = _weights_dict(content, path)
    source = detect_source(state)
    if source is None:
        raise ConversionError(f"{path}: not a RetinaNet of torchvision, detectron2 or PaddleDetection, nor a "
                              f"retinanet checkpoint (keys such as {sorted(state)[:3]})")
    return source, state


def detect_source(state: dict) -> str | None:
    """Which library's RetinaNet a weights dict is, from its key names; None if none."""
    if any(key.startswith("head.classification_head.") for key in state):
        return "torchvision"
    if "head.retina_cls.weight" in state:
        return "paddle"
    if "head.cls_score.weight" in state and any(key.startswith("backbone.bottom_up.") for key in state):
        return "detectron2"
    return None


def _load_weight_file(path: Path, trust: bool, as_torch: bool):
    """The content of a torch file or a pickle, read without running code (unless `trust`)."""
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder, not a weight file")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch zip, or a pickle (protocol >= 2)
        raise ConversionError(f"{path}: not a weight file (neither a torch checkpoint nor a pickle)")
    if as_torch or magic.startswith(b"PK\x03\x04") or path.suffix in (".pth", ".pt"):
        return load_torch_state(path, trust)
    return load_pickle(path, trust)


def _weights_dict(content, path: Path) -> dict:
    """The weights inside a loaded file: detectron2 nests them under "model", training
    scripts under "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(content, dict) and isinstance(content.get(key), dict):
            content = content[key]
    if not isinstance(content, dict) or not content:
        raise ConversionError(f"{path}: holds no weights dictionary")
    return content


def convert_file(source: str, src: str | Path, dst: str | Path, num_classes: int | None = None,
                 trust: bool = False, force: bool = False) -> ModelConfig:
    """Convert `src` into our checkpoint `dst`. Never writes over `src`; writes over an
    existing `dst` only with `force`."""
    src, dst = Path(src), Path(dst)
    if num_classes is not None and num_classes < 1:
        raise ConversionError(f"--num-classes must be at least 1, got {num_classes}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConversionError(f"{dst}: the destination is the source file; choose another name")
    if dst.is_dir():
        raise ConversionError(f"{dst}: is a folder; give the checkpoint file to write")
    if dst.exists() and not force:
        raise ConversionError(f"{dst}: already exists; pass --force to replace it")
    state = read_source(source, src, trust)
    try:
        config, weights = convert_state(source, state, num_classes)
    except ConversionError as err:
        raise ConversionError(f"{src}: {err}") from None
    write_checkpoint(dst, config, weights, meta={"converted_from": {"source": source, "file": str(src)}})
    return config
