"""The one checkpoint format: one writer, one reader, for trained, converted and saved models.

A checkpoint is a `torch.save`d dict of tensors and plain data (it loads with
`weights_only=True`, so no code in it can run):

    {"format": "retinanet-checkpoint", "version": 2,
     "model_config": {...},          # ModelConfig as plain data: class names and category ids included
     "weights": state_dict,          # the model to predict with (the EMA weights when EMA is on)
     "run_config": {...},            # optional: the full training config
     "training": {...},              # optional: optimizer, iteration, RNG states, ... (resume)
     "meta": {...}}                  # optional: provenance, e.g. {"converted_from": ...}

Version 1 files (`config` + `model` keys, training state at the top level) are read and
upgraded in memory. A file of a newer version than this code is refused with a message
saying so. Files are written atomically: a temporary file beside the target, fsync, rename.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model.config import (ConfigError, ModelConfig, apply_overrides, check_config, config_from_dict,
                           config_to_dict)
from .model.detector import RetinaNet
from .outputs import atomic_output

CHECKPOINT_FORMAT = "retinanet-checkpoint"
CHECKPOINT_VERSION = 2
_TRAINING_KEYS_V1 = ("optimizer", "scaler", "iteration", "max_iter", "best_ap", "rng", "train_model", "ema_updates")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged, unsafe, too new or not ours; the message names it."""


@dataclass
class Checkpoint:
    model_config: ModelConfig
    weights: dict[str, torch.Tensor]
    run_config: dict | None = None
    training: dict | None = None
    meta: dict = field(default_factory=dict)


def write_checkpoint(path: str | Path, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                     run_config: dict | None = None, training: dict | None = None,
                     meta: dict | None = None) -> Path:
    """Save atomically: a crash at any moment leaves the old file or the new one, never a torn one.
    The model config is checked first, so that no file is written that could not be read."""
    data: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                            "model_config": config_to_dict(check_config(model_config)), "weights": weights}
    if run_config is not None:
        data["run_config"] = run_config
    if training is not None:
        data["training"] = training
    if meta:
        data["meta"] = meta
    return atomic_torch_save(data, path)


def atomic_torch_save(data: Any, path: str | Path) -> Path:
    """`torch.save` through `atomic_output`: the old file or the new one, never a torn one; a
    full or read-only disk is `OutputNotWritten` naming `path`."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(data, f)  # through a Python file: a failed write is an OSError with its errno
    return Path(path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint with `weights_only=True` (no code can run), with one-line errors."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # damaged zip, truncated file, forbidden pickle content
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint (damaged, truncated, or it holds objects that "
            f"a weights-only load refuses): {type(err).__name__}: {first_line}"
        ) from None
    return checkpoint_from_data(data, path)


def is_checkpoint_data(data: Any) -> bool:
    """Whether a loaded file's content is one of our checkpoints (of any version)."""
    return isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT


def checkpoint_from_data(data: Any, path: str | Path) -> Checkpoint:
    """A `Checkpoint` from the content of a file loaded with `weights_only=True`; errors name `path`."""
    if not is_checkpoint_data(data):
        raise CheckpointError(
            f"{path}: not a retinanet checkpoint (to use weights from torchvision, detectron2 or "
            f"PaddleDetection, convert them first: retinanet convert --help)"
        )
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: written by a newer retinanet (checkpoint format version {version}; this "
                              f"code reads versions up to {CHECKPOINT_VERSION}): upgrade retinanet to load it")
    if version == 1:
        data = _upgrade_v1(data)
    if not isinstance(data.get("weights"), dict) or not isinstance(data.get("model_config"), dict):
        raise CheckpointError(f"{path}: the checkpoint lacks its weights or its model config")
    try:
        model_config = config_from_dict(ModelConfig, upgrade_model_config_dict(data["model_config"]), "model")
    except ConfigError as err:
        raise CheckpointError(f"{path}: stored model config is invalid: {err}") from None
    return Checkpoint(model_config, data["weights"], data.get("run_config"), data.get("training"),
                      data.get("meta") or {})


def upgrade_model_config_dict(model: dict) -> dict:
    """Settings renamed or retyped since version 1, in a stored model config."""
    model = dict(model)
    inference = model.get("inference")
    if isinstance(inference, dict) and isinstance(inference.get("clip_boxes"), bool):
        model["inference"] = {**inference, "clip_boxes": "before_nms" if inference["clip_boxes"] else "none"}
    return model


def _upgrade_v1(data: dict) -> dict:
    config = data.get("config")
    if not isinstance(config, dict) or "model" not in data:
        raise CheckpointError("version 1 checkpoint without config or model")
    full = "train" in config and isinstance(config.get("model"), dict)
    out = {"model_config": config["model"] if "backbone" not in config else config, "weights": data["model"],
           "run_config": config if full else None}
    training = {k: data[k] for k in _TRAINING_KEYS_V1 if k in data}
    if training:
        out["training"] = training
    if "converted_from" in data:
        out["meta"] = {"converted_from": data["converted_from"]}
    return out


def load_model(path: str | Path, map_location: str | torch.device = "cpu", overrides: list[str] | None = None,
               optimize: bool = True, compile: bool = False) -> RetinaNet:
    """Rebuild the model from the config stored in a checkpoint, load its weights and put it
    on `map_location`. `overrides` are `key=value` strings on the model config (e.g.
    `inference.score_threshold=0.3`).

    `optimize` (the default): the model is ready to predict as `retinanet predict`, `eval`
    and `serve` run it (`RetinaNet.optimize_for_inference`: eval mode, BatchNorm folded into
    the convolutions, channels-last memory; `compile` adds torch.compile). Its detections
    equal the plain model's up to float rounding; it refuses `.train()`, and `save_model`
    refuses it. `optimize=False`: the model as built from the config, BatchNorm modules kept,
    in training mode: to train or fine-tune it, or to change and save its weights."""
    if compile and not optimize:
        raise ValueError("compile=True needs optimize=True (the compiled model is the optimized one)")
    checkpoint = read_checkpoint(path, map_location)
    model = RetinaNet.from_config(apply_overrides(checkpoint.model_config, overrides or []))
    try:
        model.load_state_dict(checkpoint.weights)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {str(err).splitlines()[0]}") from None
    model.to(map_location)
    return model.optimize_for_inference(compile=compile) if optimize else model


def save_model(model: RetinaNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write a model's weights and config so that `load_model` rebuilds it."""
    if model.config is None:
        raise ValueError("this model was not built from a config; build it with RetinaNet.from_config")
    if model.inference_only:
        raise ValueError("this model was optimized for inference (BatchNorm folded): its weights no longer fit "
                         "its config; save the model as loaded with retinanet.load_model(path, optimize=False)")
    return write_checkpoint(path, model.config, model.state_dict(), meta=meta)


def capture_rng() -> dict:
    """RNG states of Python, NumPy, torch (CPU) and CUDA as tensors and plain tuples (no
    pickled objects, so the checkpoint still loads with `weights_only`): saved in a training
    checkpoint so that `--resume` continues exactly."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the RNG states `capture_rng` took (CUDA's only where CUDA is available)."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
