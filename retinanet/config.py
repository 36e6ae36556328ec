"""The full configuration of a run: model, data, training and evaluation.

YAML files shipped in `retinanet/configs/` hold these; `key=value` overrides apply on top; every checkpoint
stores the resolved config so that the checkpoint alone rebuilds the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from . import configs
from .outputs import write_text
from .model.config import (ConfigError, Fraction, ModelConfig, NonNegativeFloat, NonNegativeInt, PositiveFloat,
                           PositiveInt, Range, apply_overrides, check_config, config_from_dict, config_to_dict,
                           config_to_yaml)

__all__ = ["Config", "DataConfig", "TrainConfig", "EvalConfig", "TTAConfig", "ConfigError", "load_config",
           "save_config", "config_to_dict", "config_from_dict", "check_config", "shipped_configs", "resolve_config",
           "sets_model"]


@dataclass
class TileConfig:
    """Cut large images into tiles for training and evaluation (`size` 0: off)."""

    size: NonNegativeInt = 0  # tile side in pixels; give it the model's input size (no resizing)
    overlap: Annotated[float, Range(0, 1, open_max=True)] = 0.2  # share of a tile that neighbours share
    min_visible: Fraction = 0.5  # a box cut by a tile border is trained if this much of it is inside
    empty_ratio: Fraction = 1.0  # share of tiles without objects that are kept
    merge: Literal["nms", "nmm"] = "nms"  # evaluation: how detections of overlapping tiles are merged
    # run tiles smaller than the model's smallest anchor, or an overlap making over 16x the tiles of overlap 0
    force: bool = False


Fill = list[Annotated[int, Range(0, 255)]]


@dataclass
class FlipAugment:
    """Mirror left-right (`hflip`) or top-bottom (`vflip`)."""

    kind: Literal["hflip", "vflip"]
    p: Fraction = 0.5


@dataclass
class Rotate90Augment:
    """Turn by 90, 180 or 270 degrees (each equally likely); p 0.75: all four orientations alike."""

    kind: Literal["rotate90"]
    p: Fraction = 0.75


@dataclass
class PhotometricAugment:
    """Colour jitter, in this order: brightness, contrast and saturation factors, and a hue shift
    (turns of the colour wheel), each uniform in its [low, high] range; boxes are unchanged."""

    kind: Literal["photometric"]
    p: Fraction = 1.0
    brightness: list[NonNegativeFloat] = field(default_factory=lambda: [0.8, 1.2])
    contrast: list[NonNegativeFloat] = field(default_factory=lambda: [0.8, 1.2])
    saturation: list[NonNegativeFloat] = field(default_factory=lambda: [0.8, 1.2])
    # off by default: a hue shift costs several times the other three (a round trip through HSV)
    hue: list[Annotated[float, Range(-0.5, 0.5)]] = field(default_factory=lambda: [0.0, 0.0])


@dataclass
class ScaleJitterAugment:
    """The image rescaled by s (uniform in `scale`) and cropped (s > 1) or padded with `fill`
    (s < 1) back to its size at a random place: large-scale jitter is [0.1, 2.0]. Boxes cut by
    the crop to under `min_visible` of their area become ignored regions."""

    kind: Literal["scale_jitter"]
    p: Fraction = 1.0
    scale: list[Annotated[float, Range(0.05, 8)]] = field(default_factory=lambda: [0.1, 2.0])
    min_visible: Fraction = 0.5
    fill: Fill = field(default_factory=lambda: [124, 116, 104])  # the ImageNet mean


@dataclass
class ZoomOutAugment:
    """The image shrunk by 1/z (z uniform in [1, max_scale]) onto a canvas of its size filled
    with `fill`, at a random place: objects appear up to max_scale times smaller (SSD's zoom-out)."""

    kind: Literal["zoom_out"]
    p: Fraction = 0.5
    max_scale: Annotated[float, Range(1, 8)] = 4.0
    fill: Fill = field(default_factory=lambda: [124, 116, 104])


AugmentOp = FlipAugment | Rotate90Augment | PhotometricAugment | ScaleJitterAugment | ZoomOutAugment


def check_augment(ops: list, horizontal_flip: float) -> None:
    """What the field types cannot say: ranges are [low, high], fills one value per channel, and
    a listed hflip is not doubled by `data.horizontal_flip`."""
    for i, op in enumerate(ops):
        where = f"data.augment[{i}]"
        for name in ("brightness", "contrast", "saturation", "hue", "scale"):
            pair = getattr(op, name, None)
            if pair is not None and not (len(pair) == 2 and pair[0] <= pair[1]):
                raise ConfigError(f"{where}.{name}: {pair!r} must be [low, high] with low <= high")
        fill = getattr(op, "fill", None)
        if fill is not None and len(fill) != 3:
            raise ConfigError(f"{where}.fill: {fill!r} needs 3 values (one per channel, 0-255)")
        if op.kind == "hflip" and horizontal_flip > 0:
            raise ConfigError(f"{where}: hflip is listed while data.horizontal_flip is {horizontal_flip:g}; "
                              "set data.horizontal_flip: 0 (the listed flip replaces it)")


@dataclass
class DataConfig:
    format: Literal["coco", "csv", "voc", "yolo"] = "coco"  # how the annotations are written
    train_images: str = ""  # folder of training images
    train_annotations: str = ""  # coco: json; csv: the CSV file; voc: folder of XML; yolo: labels folder
    val_images: str = ""
    val_annotations: str = ""
    classes: str = ""  # class list (yolo: data.yaml or classes.txt; csv: classes CSV); else the names found
    voc_difficult: Literal["ignore", "train", "drop"] = "ignore"  # VOC `difficult` objects
    tile: TileConfig = field(default_factory=TileConfig)
    horizontal_flip: Fraction = 0.5  # probability
    # training: each image is cropped to 1/z of its sides (z uniform in [1, max_zoom], at a random
    # place) and resized back, so that objects appear up to max_zoom times larger; boxes cut to
    # under half their area are ignored. 1: off. It trades small objects for large (on the demo it
    # lowered APs and raised APl)
    max_zoom: Annotated[float, Range(1, 4)] = 1.0
    aspect_ratio_grouping: bool = True  # batches of only landscape or only portrait images
    num_workers: NonNegativeInt = 4  # data-loading processes per GPU (0: load in the main process)
    strict: bool = False  # a bad image stops the run instead of being skipped and listed
    # images that are not 8-bit (16-bit, 12-bit in 16, float) read by windows: the values that map
    # to black and white, e.g. [0, 4095]; empty: the data's own range (declared bit depth, or a sample)
    value_range: list[float] = field(default_factory=list)
    # training augmentations applied in order, after max_zoom and horizontal_flip; each a mapping
    # with its `kind` (hflip, vflip, rotate90, photometric, scale_jitter, zoom_out), `p` and ranges
    augment: list[AugmentOp] = field(default_factory=list)

    def __post_init__(self):
        check_augment(self.augment, self.horizontal_flip)
        if self.value_range and not (len(self.value_range) == 2 and self.value_range[0] < self.value_range[1]):
            raise ConfigError(f"data.value_range: {self.value_range!r} must be empty or [low, high] with low < high")


@dataclass
class TrainConfig:
    batch_size: PositiveInt = 16  # global: split over all processes
    reference_batch_size: PositiveInt = 16  # lr/iterations below are for this batch; scaled linearly
    max_iter: PositiveInt = 90000
    optimizer: Literal["sgd", "adamw"] = "sgd"
    base_lr: PositiveFloat = 0.01
    momentum: Annotated[float, Range(0, 1, open_max=True)] = 0.9
    weight_decay: NonNegativeFloat = 1e-4
    weight_decay_norm: NonNegativeFloat = 0.0
    schedule: Literal["step", "cosine"] = "step"
    steps: list[PositiveInt] = field(default_factory=lambda: [60000, 80000])
    gamma: Annotated[float, Range(0, 1, open_min=True)] = 0.1
    warmup_iters: NonNegativeInt = 1000
    warmup_factor: Annotated[float, Range(0, 1, open_min=True)] = 0.001
    clip_grad_norm: NonNegativeFloat = 0.0  # 0: off
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"  # auto: bf16 where the hardware has it natively; fp16: grad scaler (CUDA)
    channels_last: bool = False
    compile: bool = False  # torch.compile networks, matching and losses: faster GPU steps; compiling costs minutes
    ema_decay: Annotated[float, Range(0, 1, open_max=True)] = 0.0  # 0: off; else evaluate/export an exponential moving average
    max_minutes: NonNegativeFloat = 0.0  # > 0: shorten max_iter to fit this wall-clock budget
    seed: int = 42
    deterministic: bool = False
    log_period: PositiveInt = 20
    checkpoint_period: PositiveInt = 5000
    eval_period: NonNegativeInt = 0  # 0: evaluate only at the end
    nonfinite_loss: Literal["stop", "skip"] = "stop"  # what a NaN/inf loss does
    pretrained_backbone: str = ""  # ImageNet weights: a local file, or a torchvision weight name
    # Fine-tuning: start from a trained detector, i.e. one of our checkpoints, a torchvision /
    # detectron2 / PaddleDetection weight file, or a zoo name (`retinanet zoo`). The data's
    # classes keep the classifier rows of the source's classes of the same name.
    weights: str = ""
    class_map: str = ""  # names that differ, "mine:theirs,...", e.g. "car:truck,bike:bicycle"
    # What does not train: "none" (the model's backbone.freeze_at alone), "backbone" (every ResNet
    # stage), "backbone+fpn", or as torchvision's trainable_backbone_layers, 0-5 trainable stages
    freeze: Literal["none", "backbone", "backbone+fpn"] | Annotated[int, Range(0, 5)] = "none"
    threads: NonNegativeInt = 0  # CPU threads for torch (0: torch's default)
    # where the run is tracked besides metrics.jsonl: tensorboard, csv (metrics.csv), mlflow, wandb
    loggers: list[Literal["tensorboard", "csv", "mlflow", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    # your own retinanet.Callback classes, "module:Class" (each built with no arguments)
    callbacks: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(set(self.loggers)) != len(self.loggers):
            raise ConfigError(f"train.loggers: {self.loggers!r} names a logger twice")
        for name in self.callbacks:
            module, _, attr = name.partition(":")
            if not (module and attr):
                raise ConfigError(f"train.callbacks: {name!r} must be \"module:Class\"")


@dataclass
class TTAConfig:
    """Test-time augmentation in `retinanet eval` (off by default; the evaluations during
    training run without it): each image is also predicted mirrored and/or at other sizes, and
    the detections of all views are merged per class."""

    flip: bool = False  # retinanet eval (not the evaluations in training): also each view mirrored left-right
    # extra input sizes (short sides, as model.input.test_min_size; the long-side cap scales alike)
    sizes: list[PositiveInt] = field(default_factory=list)
    # how the views' detections are merged, per class at the model's NMS IoU threshold: nms keeps the
    # best box; wbf (weighted box fusion) averages overlapping boxes, weighted by score
    merge: Literal["nms", "wbf"] = "nms"

    @property
    def enabled(self) -> bool:
        return self.flip or bool(self.sizes)


@dataclass
class EvalConfig:
    batch_size: PositiveInt = 8  # global
    max_images: NonNegativeInt = 0  # 0: all
    compile: bool = False  # `retinanet eval`: torch.compile the network (and NMS on a GPU); the first batches wait for the compiler
    # precision, recall, F1 and confusion matrix: they count the detections scored at least this
    score_threshold: Fraction = 0.5
    # precision, recall, F1 and confusion matrix: a detection finds a ground-truth box at this IoU or more
    iou: Annotated[float, Range(0, 1, open_min=True)] = 0.5
    # who computes COCO AP: auto is faster-coco-eval where installed (the same numbers, in C++), else pycocotools
    coco_backend: Literal["auto", "pycocotools", "faster-coco-eval"] = "auto"
    tta: TTAConfig = field(default_factory=TTAConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "output"


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (`retinanet/configs/*.yaml`)."""
    return configs.names()


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file path, or the path of a shipped config named `name` (with or without `.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if str(path) in (name, name + ".yaml") and name in shipped_configs():
        return configs.path(name)
    raise ConfigError(f"{name_or_path}: no such config file, and not a shipped config "
                      f"(shipped: {', '.join(shipped_configs())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path or a shipped name; safe loader), then apply `key=value`
    overrides. Every value is checked here, before any data is read. A file that is not text
    (a checkpoint given as the config, an image) is a `ConfigError` naming it."""
    data: dict = {}
    if path is not None:
        path = resolve_config(path)
        text = _read_text(path)
        if text is None:
            raise ConfigError(f"not a YAML config: {path} (a binary file; checkpoints go to --weights)")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
    try:
        config = config_from_dict(Config, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from err
    return apply_overrides(config, overrides or [])


def _read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None for a binary file: one with a NUL byte in its first
    8 KiB (known without reading a large checkpoint whole) or that is not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(8192)
        if b"\0" in head:
            return None
        raw = head + f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def sets_model(name_or_path: str | Path) -> bool:
    """Whether a config file has a `model` section (a fine-tuning recipe has none: its model
    comes from the weights it starts from)."""
    return "model" in (yaml.safe_load(resolve_config(name_or_path).read_text()) or {})


def save_config(config: Config, path: str | Path) -> None:
    write_text(path, config_to_yaml(config))
