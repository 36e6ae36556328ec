"""Typed configuration of the RetinaNet model, and the dataclass <-> dict machinery.

The model package reads no files and no global state: `build.py` turns a `ModelConfig`
into modules with explicit constructor arguments. Every field declares its allowed values
next to it (`Literal[...]` for choices, `Annotated[..., Range(...)]` for bounds); they are
checked when a config is built from plain data, so a wrong value fails at load time with
one line naming the dotted key. The helpers at the bottom (`config_to_dict`,
`config_from_dict`, `apply_overrides`) are generic over any nested dataclass and are reused
by the full training config in `retinanet.config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the dotted key."""


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric field; `open_min`/`open_max` exclude the bound itself."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def check(self, value: float, where: str) -> None:
        low_ok = self.min is None or (value > self.min if self.open_min else value >= self.min)
        high_ok = self.max is None or (value < self.max if self.open_max else value <= self.max)
        if not (low_ok and high_ok):
            raise ConfigError(f"{where}: {value!r} is out of range (allowed: {self.describe()})")

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{'(' if self.open_min else '['}{self.min:g}, {self.max:g}{')' if self.open_max else ']'}"
        if self.min is not None:
            return f"{'>' if self.open_min else '>='} {self.min:g}"
        return f"{'<' if self.open_max else '<='} {self.max:g}"


PositiveInt = Annotated[int, Range(min=1)]
NonNegativeInt = Annotated[int, Range(min=0)]
PositiveFloat = Annotated[float, Range(min=0, open_min=True)]
NonNegativeFloat = Annotated[float, Range(min=0)]
Fraction = Annotated[float, Range(0, 1)]  # a probability or IoU in [0, 1]


def default_anchor_sizes(base_sizes=(32, 64, 128, 256, 512), scales_per_octave=3) -> list[list[float]]:
    """Per level `[x, x*2^(1/3), x*2^(2/3)]` as in the paper (for 3 scales per octave)."""
    return [[x * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)] for x in base_sizes]


@dataclass
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    freeze_at: Annotated[int, Range(0, 5)] = 2  # 0: nothing frozen, 1: stem, 2: stem + res2, ... 5: everything
    stride_in_1x1: bool = False  # MSRA/detectron2 bottleneck: stride on the first 1x1 conv


@dataclass
class FPNConfig:
    out_channels: PositiveInt = 256
    p6_source: Literal["c5", "p5"] = "c5"  # c5 (paper, detectron2) | p5 (torchvision v1, PaddleDetection)


@dataclass
class HeadConfig:
    num_convs: NonNegativeInt = 4
    norm: Literal["none", "gn"] = "none"  # gn: torchvision v2 style, GroupNorm(32)
    prior_prob: Annotated[float, Range(0, 1, open_min=True, open_max=True)] = 0.01


@dataclass
class AnchorConfig:
    sizes: list[list[PositiveFloat]] = field(default_factory=default_anchor_sizes)
    aspect_ratios: list[PositiveFloat] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    strides: list[PositiveInt] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    offset: Fraction = 0.0  # anchor centres at (i + offset) * stride
    round_cell_anchors: bool = False  # torchvision rounds the per-location templates
    stride_from_image_size: bool = False  # torchvision: stride = padded image size // feature size

    def __post_init__(self):
        if len(self.sizes) != len(self.strides):
            raise ConfigError(f"model.anchors: {len(self.sizes)} levels of sizes but {len(self.strides)} strides")
        if len({len(level) for level in self.sizes}) > 1:
            raise ConfigError("model.anchors.sizes: every level needs the same number of sizes (the head is shared)")
        if not self.sizes or not self.sizes[0] or not self.aspect_ratios:
            raise ConfigError("model.anchors: sizes and aspect_ratios must not be empty")


@dataclass
class BoxCodingConfig:
    weights: list[PositiveFloat] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    scale_clamp: PositiveFloat = math.log(1000.0 / 16)

    def __post_init__(self):
        if len(self.weights) != 4:
            raise ConfigError(f"model.box_coding.weights: {self.weights!r} needs 4 values (dx, dy, dw, dh)")


@dataclass
class MatcherConfig:
    fg_iou_threshold: Fraction = 0.5
    bg_iou_threshold: Fraction = 0.4
    allow_low_quality_matches: bool = True
    crowd_ioa_threshold: Fraction = 0.5  # anchors covered this much by a crowd box are ignored

    def __post_init__(self):
        if self.bg_iou_threshold > self.fg_iou_threshold:
            raise ConfigError(f"model.matcher: bg_iou_threshold {self.bg_iou_threshold} is above "
                              f"fg_iou_threshold {self.fg_iou_threshold}")


@dataclass
class LossConfig:
    focal_alpha: Annotated[float, Range(-1, 1)] = 0.25  # < 0: no alpha weighting
    focal_gamma: NonNegativeFloat = 2.0
    box_loss: Literal["smooth_l1", "l1", "giou"] = "smooth_l1"
    smooth_l1_beta: NonNegativeFloat = 0.1  # 0: plain L1
    box_loss_weight: NonNegativeFloat = 1.0
    normalization: Literal["batch", "ema", "per_image"] = "batch"  # ema: detectron2; per_image: torchvision
    ema_momentum: Fraction = 0.9
    ema_initial: PositiveFloat = 100.0


@dataclass
class InferenceConfig:
    score_threshold: Fraction = 0.05
    topk_candidates: PositiveInt = 1000  # per level
    candidates: Literal["per_class", "per_anchor"] = "per_class"  # top-k over (anchor, class) pairs | "per_anchor": by max class score (Paddle)
    nms_pre_per_class: NonNegativeInt = 0  # > 0: at most this many boxes per class enter NMS (PaddleDetection: 1000)
    nms_threshold: Fraction = 0.5
    # the most detections kept per image, best scores first; an image that reaches it loses the rest
    # (predict and eval say so once): raise it for dense scenes (predict/serve/export --max-detections)
    detections_per_image: PositiveInt = 100
    clip_boxes: Literal["before_nms", "after_nms", "none"] = "before_nms"  # after_nms: detectron2
    min_box_size: float = 0.0  # boxes with width or height <= this (input pixels) are dropped


@dataclass
class InputConfig:
    """How images become the network's input tensor."""

    train_min_sizes: list[PositiveInt] = field(default_factory=lambda: [800])  # one picked per image
    test_min_size: PositiveInt = 800
    max_size: PositiveInt = 1333
    resize: bool = True
    pixel_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    pixel_std: list[PositiveFloat] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    pixel_scale: Literal[1.0, 255.0] = 1.0  # the value range mean/std are given in: 1.0 ([0,1]) or 255.0
    channel_order: Literal["RGB", "BGR"] = "RGB"  # the order the backbone was trained with
    size_divisibility: PositiveInt = 32

    def __post_init__(self):
        for name in ("pixel_mean", "pixel_std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"model.input.{name}: {getattr(self, name)!r} needs 3 values (one per channel)")
        if not self.train_min_sizes:
            raise ConfigError("model.input.train_min_sizes must not be empty")


@dataclass
class ModelConfig:
    num_classes: PositiveInt = 80
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

    def __post_init__(self):
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ConfigError(f"model.class_names has {len(self.class_names)} names for "
                              f"num_classes={self.num_classes}")
        if self.category_ids and (len(self.category_ids) != self.num_classes
                                  or len(set(self.category_ids)) != len(self.category_ids)):
            raise ConfigError(f"model.category_ids needs {self.num_classes} distinct ids, got {self.category_ids!r}")


# ----------------------------------------------------------------------------------------
# Generic dataclass <-> plain data


def config_to_dict(config: Any) -> dict:
    """A nested dataclass as plain dicts/lists/scalars (safe for YAML and weights_only)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def config_from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from `data`, checking every key, type, choice and bound."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {_join(where, unknown[0])!r} (known: {', '.join(sorted(names))})")
    values = {name: _convert(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def check_config(config: Any) -> Any:
    """Re-check a config built in code (every field's type, choice and bound); returns it."""
    return config_from_dict(type(config), config_to_dict(config))


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` strings (values parsed as YAML; `key=` sets an empty string)
    and return a new, checked config."""
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
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {key!r}: value {text!r} is not valid YAML") from None
    return config_from_dict(type(config), data)


def _kinds(alternatives: tuple) -> dict[str, type]:
    """For a union of dataclasses that each declare `kind: Literal[...]` (a tagged union, e.g.
    the list of augmentations): each kind's dataclass; else empty."""
    kinds: dict[str, type] = {}
    for alternative in alternatives:
        if not dataclasses.is_dataclass(alternative):
            return {}
        hint = typing.get_type_hints(alternative).get("kind")
        if typing.get_origin(hint) is not Literal:
            return {}
        kinds.update((kind, alternative) for kind in typing.get_args(hint))
    return kinds


def _convert_kind(kinds: dict[str, type], value: Any, where: str) -> Any:
    """The dataclass of the tagged union that `value["kind"]` names, checked as any other."""
    choices = ", ".join(kinds)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with a kind ({choices}), got {value!r}")
    if "kind" not in value:
        raise ConfigError(f"{where}: no kind given (choose from {choices})")
    kind = value["kind"]
    if not isinstance(kind, str) or kind not in kinds:
        raise ConfigError(f"{_join(where, 'kind')}: {kind!r} is not allowed (choose from {choices})")
    return config_from_dict(kinds[kind], value, where)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Annotated:
        value = _convert(args[0], value, where)
        for bound in args[1:]:
            if isinstance(bound, Range):
                bound.check(value, where)
        return value
    if origin is Literal:
        for allowed in args:
            if type(value) is type(allowed) and value == allowed:
                return value
            if isinstance(allowed, float) and isinstance(value, int) and not isinstance(value, bool) \
                    and value == allowed:
                return float(value)
        choices = ", ".join(str(a) for a in args)
        raise ConfigError(f"{where}: {value!r} is not allowed (choose from {choices})")
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = _kinds(args)
        if kinds:
            return _convert_kind(kinds, value, where)
        problems = []
        for alternative in (a for a in args if a is not type(None)):  # the first that accepts the value
            try:
                return _convert(alternative, value, where)
            except ConfigError as err:
                problems.append(str(err).removeprefix(f"{where}: "))
        raise ConfigError(f"{where}: " + "; or ".join(problems))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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
