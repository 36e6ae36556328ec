"""Typed configuration of the RetinaNet model, and the dataclass <-> dict machinery.

The model package reads no files and no global state: `build.py` turns a `ModelConfig`
into modules with explicit constructor arguments. The helpers at the bottom
(`config_to_dict`, `config_from_dict`, `apply_overrides`) are generic over any nested
dataclass and are reused by the full training config in `retinanet.config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

import yaml


def default_anchor_sizes(base_sizes=(32, 64, 128, 256, 512), scales_per_octave=3) -> list[list[float]]:
    """Per level `[x, x*2^(1/3), x*2^(2/3)]` as in the paper (for 3 scales per octave)."""
    return [[x * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)] for x in base_sizes]


@dataclass
class BackboneConfig:
    depth: int = 50  # 18, 34, 50 or 101
    norm: str = "frozen_bn"  # frozen_bn | bn | gn
    freeze_at: int = 2  # 0: nothing frozen, 1: stem, 2: stem + res2, ... 5: everything
    stride_in_1x1: bool = False  # MSRA/detectron2 bottleneck: stride on the first 1x1 conv


@dataclass
class FPNConfig:
    out_channels: int = 256
    p6_source: str = "c5"  # c5 (paper, detectron2) | p5 (torchvision v1, PaddleDetection)


@dataclass
class HeadConfig:
    num_convs: int = 4
    norm: str = "none"  # none | gn (torchvision v2 style, GroupNorm(32))
    prior_prob: float = 0.01


@dataclass
class AnchorConfig:
    sizes: list[list[float]] = field(default_factory=default_anchor_sizes)
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    offset: float = 0.0  # anchor centres at (i + offset) * stride
    round_cell_anchors: bool = False  # torchvision rounds the per-location templates
    stride_from_image_size: bool = False  # torchvision: stride = padded image size // feature size


@dataclass
class BoxCodingConfig:
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    scale_clamp: float = math.log(1000.0 / 16)


@dataclass
class MatcherConfig:
    fg_iou_threshold: float = 0.5
    bg_iou_threshold: float = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa_threshold: float = 0.5  # anchors covered this much by a crowd box are ignored


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 | giou
    smooth_l1_beta: float = 0.1
    box_loss_weight: float = 1.0
    normalization: str = "batch"  # batch | ema (detectron2) | per_image (torchvision)
    ema_momentum: float = 0.9
    ema_initial: float = 100.0


@dataclass
class InferenceConfig:
    score_threshold: float = 0.05
    topk_candidates: int = 1000  # per level
    candidates: str = "per_class"  # top-k over (anchor, class) pairs | "per_anchor": by max class score (Paddle)
    nms_pre_per_class: int = 0  # > 0: at most this many boxes per class enter NMS (PaddleDetection: 1000)
    nms_threshold: float = 0.5
    detections_per_image: int = 100
    clip_boxes: bool = True
    min_box_size: float = 0.0  # boxes with width or height <= this (input pixels) are dropped


@dataclass
class InputConfig:
    """How images become the network's input tensor."""

    train_min_sizes: list[int] = field(default_factory=lambda: [800])  # one picked per image
    test_min_size: int = 800
    max_size: int = 1333
    resize: bool = True
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    pixel_scale: float = 1.0  # the value range mean/std are given in: 1.0 ([0,1]) or 255.0
    channel_order: str = "RGB"  # RGB | BGR: the order the backbone was trained with
    size_divisibility: int = 32


@dataclass
class ModelConfig:
    num_classes: int = 80
    class_names: list[str] = field(default_factory=list)
    category_ids: list[int] = field(default_factory=list)  # dataset category id per label, if not the label
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    box_coding: BoxCodingConfig = field(default_factory=BoxCodingConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    input: InputConfig = field(default_factory=InputConfig)


# ----------------------------------------------------------------------------------------
# Generic dataclass <-> plain data


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


def config_to_dict(config: Any) -> dict:
    """A nested dataclass as plain dicts/lists/scalars (safe for YAML and weights_only)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key and value type."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r} (known: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    return cls(**values)


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings (values parsed as YAML) and return a new config."""
    data = config_to_dict(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(text)
    return config_from_dict(type(config), data)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value
