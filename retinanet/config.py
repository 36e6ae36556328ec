"""The full configuration of a run: model, data, training and evaluation.

YAML files in `configs/` hold these; `key=value` overrides apply on top; every checkpoint
stores the resolved config so that the checkpoint alone rebuilds the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model.config import ConfigError, ModelConfig, apply_overrides, config_from_dict, config_to_dict, config_to_yaml

__all__ = ["Config", "DataConfig", "TrainConfig", "EvalConfig", "ConfigError", "load_config", "save_config",
           "config_to_dict", "config_from_dict"]


@dataclass
class DataConfig:
    train_images: str = ""  # folder of training images
    train_annotations: str = ""  # COCO-format json
    val_images: str = ""
    val_annotations: str = ""
    horizontal_flip: float = 0.5  # probability
    aspect_ratio_grouping: bool = True  # batches of only landscape or only portrait images
    num_workers: int = 4  # data-loading processes per GPU (0: load in the main process)
    strict: bool = False  # a bad image stops the run instead of being skipped and listed


@dataclass
class TrainConfig:
    batch_size: int = 16  # global: split over all processes
    reference_batch_size: int = 16  # lr/iterations below are for this batch; scaled linearly
    max_iter: int = 90000
    optimizer: str = "sgd"  # sgd | adamw
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0
    schedule: str = "step"  # step | cosine
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    clip_grad_norm: float = 0.0  # 0: off
    amp: str = "none"  # none | bf16 | fp16 (fp16 uses a grad scaler; CUDA)
    channels_last: bool = False
    ema_decay: float = 0.0  # 0: off; else evaluate/export an exponential moving average
    max_minutes: float = 0.0  # > 0: shorten max_iter to fit this wall-clock budget
    seed: int = 42
    deterministic: bool = False
    log_period: int = 20
    checkpoint_period: int = 5000
    eval_period: int = 0  # 0: evaluate only at the end
    nonfinite_loss: str = "stop"  # stop | skip: what a NaN/inf loss does
    pretrained_backbone: str = ""  # ImageNet weights: a local file, or a torchvision weight name
    threads: int = 0  # CPU threads for torch (0: torch's default)


@dataclass
class EvalConfig:
    batch_size: int = 8  # global
    max_images: int = 0  # 0: all


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "output"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (safe loader), then apply `key=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
    try:
        config = config_from_dict(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from err
    return apply_overrides(config, overrides or [])


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(config_to_yaml(config))

