"""Starting a run from a trained detector (`train.weights`).

The detector may be one of our checkpoints, a torchvision / detectron2 / PaddleDetection
weight file (recognised by its content and converted in memory, read without running code
in it) or a zoo name. The run's classes are matched to the detector's by name: a matched
class keeps its classifier rows, a new one starts from the prior-probability bias, as a head
built from scratch does. Everything else of the detector is kept, so the config of the run
must describe the same architecture (`architecture_differences`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import checkpoint_from_data
from ..config import Config, ConfigError, apply_overrides, load_config, sets_model
from ..convert import convert_state, read_detector
from ..model.config import ModelConfig

# Names that hold a place in a classifier's rows but are no class (torchvision's 91-way COCO layout).
PLACEHOLDER_CLASSES = frozenset({"__background__", "n/a", "background"})
FINETUNE_CONFIG = "finetune"  # the shipped recipe of a run started from a detector without --config


@dataclass
class StartWeights:
    """A detector to start from: its model config (classes included) and our state dict."""

    name: str  # as the user gave it: a file or a zoo name
    source: str  # "retinanet", or the library it was converted from
    model_config: ModelConfig
    weights: dict[str, torch.Tensor]

    @property
    def class_names(self) -> list[str]:
        return list(self.model_config.class_names)


def read_start_weights(name: str, trust: bool = False) -> StartWeights:
    """Read `name` (a file or a zoo name) as a detector to start from. Peer files are
    converted in memory; `trust` allows a full unpickle of a peer file (code may run)."""
    path = Path(name)
    if not path.exists():
        from ..zoo import is_zoo_name, resolve_weights

        if not is_zoo_name(name):
            raise ConfigError(f"train.weights {name!r}: no such file, and not a zoo name (`retinanet zoo` lists them)")
        path = resolve_weights(name, trust=trust)
    source, content = read_detector(path, trust)
    if source == "retinanet":
        checkpoint = checkpoint_from_data(content, path)
        return StartWeights(name, source, checkpoint.model_config, checkpoint.weights)
    config, weights = convert_state(source, content)
    return StartWeights(name, source, config, weights)


def finetune_config(config: str | None, weights: str, overrides: list[str] | None = None,
                    trust: bool = False) -> tuple[Config, StartWeights]:
    """The config of a run that starts from `weights`, and the detector read.

    `config` (a file or shipped name; default the shipped `finetune` recipe) gives the data,
    training and evaluation settings. A config without a `model` section takes the whole model
    config from the detector; one with it must describe the detector's architecture (the
    trainer checks, `architecture_differences`). `overrides` apply last, `model.*` ones too.
    """
    name = config or FINETUNE_CONFIG
    start = read_start_weights(weights, trust)
    cfg = load_config(name)
    if not sets_model(name):
        cfg.model = copy.deepcopy(start.model_config)
    cfg.train.weights = weights
    return apply_overrides(cfg, overrides or []), start


def architecture(cfg: ModelConfig) -> dict[str, object]:
    """The settings that decide what a model's weights mean: their shapes, and the input
    they were trained on."""
    return {
        "backbone.depth": cfg.backbone.depth,
        "backbone.stride_in_1x1": cfg.backbone.stride_in_1x1,
        "backbone.norm": "gn" if cfg.backbone.norm == "gn" else "bn or frozen_bn",
        "fpn.out_channels": cfg.fpn.out_channels,
        "fpn.p6_source": cfg.fpn.p6_source,
        "head.num_convs": cfg.head.num_convs,
        "head.norm": cfg.head.norm,
        "anchors per location": len(cfg.anchors.sizes[0]) * len(cfg.anchors.aspect_ratios),
        "anchor levels": len(cfg.anchors.strides),
        "input.pixel_mean": list(cfg.input.pixel_mean),
        "input.pixel_std": list(cfg.input.pixel_std),
        "input.pixel_scale": cfg.input.pixel_scale,
        "input.channel_order": cfg.input.channel_order,
        "box_coding.weights": list(cfg.box_coding.weights),
    }


def architecture_differences(source: ModelConfig, config: ModelConfig) -> list[str]:
    """`key: X in the weights, Y in the config` for every architecture setting that differs."""
    theirs, ours = architecture(source), architecture(config)
    return [f"{key}: {theirs[key]!r} in the weights, {ours[key]!r} in the config"
            for key in theirs if theirs[key] != ours[key]]


def parse_class_map(text: str) -> dict[str, str]:
    """`"mine:theirs,..."` as `{mine: theirs}`, names lower-cased."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        mine, sep, theirs = item.partition(":")
        if not sep or not mine.strip() or not theirs.strip():
            raise ConfigError(f"train.class_map: {item!r} is not mine:theirs (e.g. car:truck)")
        mapping[mine.strip().lower()] = theirs.strip().lower()
    return mapping


def match_classes(names: list[str], source_names: list[str], class_map: str = "") -> list[int | None]:
    """For each of the run's classes `names`, the index of the detector's class whose rows it
    starts from: the one `class_map` names, else the one of the same name (case-insensitive),
    else None (a new class)."""
    lookup: dict[str, int] = {}
    for index, name in enumerate(source_names):
        key = name.strip().lower()
        if key not in PLACEHOLDER_CLASSES:
            lookup.setdefault(key, index)
    mapping = parse_class_map(class_map)
    mine = {n.strip().lower() for n in names}
    unknown = [f"{m!r} is not a class of the data" for m in mapping if m not in mine]
    unknown += [f"{t!r} is not a class of the weights" for t in mapping.values() if t not in lookup]
    if unknown:
        raise ConfigError(f"train.class_map: {'; '.join(unknown)}")
    return [lookup.get(mapping.get(n.strip().lower(), n.strip().lower())) for n in names]


def class_table(names: list[str], rows: list[int | None], source_names: list[str]) -> str:
    """The log's table of which classes keep the detector's rows and which are new."""
    kept = sum(r is not None for r in rows)
    width = max(len(n) for n in names)
    lines = [f"classes: {kept} of {len(names)} start from the weights' classifier, {len(names) - kept} are new"]
    for name, row in zip(names, rows):
        lines.append(f"  {name:<{width}}  " + (f"kept: {source_names[row]!r} (class {row})" if row is not None
                                                 else "new: prior-probability bias"))
    return "\n".join(lines)


def start_state(fresh: dict[str, torch.Tensor], start: StartWeights, rows: list[int | None],
                num_anchors: int) -> dict[str, torch.Tensor]:
    """The state dict a run starts from: the detector's weights, except the classifier's
    output rows, which are the detector's for classes matched in `rows` and `fresh`'s (the
    newly built model's: prior-probability bias) for new ones.

    `fresh`: the new model's state dict; `rows[k]`: the detector's class for the run's class k.
    The classifier's output channels are anchor-major: channel `a * K + k`.
    """
    state = dict(fresh)
    for key, value in start.weights.items():
        if key.startswith("head.cls_score.") or (key not in state and key.endswith("num_batches_tracked")):
            continue  # a BatchNorm counter, which a frozen BatchNorm has not
        if key not in state:
            raise ConfigError(f"train.weights {start.name}: holds {key!r}, which this model has not")
        if value.shape != state[key].shape:
            raise ConfigError(f"train.weights {start.name}: {key} has shape {tuple(value.shape)}, this model "
                              f"{tuple(state[key].shape)}")
        state[key] = value.to(state[key].dtype)
    kept = [k for k, row in enumerate(rows) if row is not None]
    if kept:
        source_rows = torch.tensor([rows[k] for k in kept])
        for part in ("weight", "bias"):
            key = f"head.cls_score.{part}"
            theirs, ours = start.weights[key], state[key].clone()
            theirs_view = theirs.view(num_anchors, theirs.shape[0] // num_anchors, *theirs.shape[1:])
            ours_view = ours.view(num_anchors, len(rows), *ours.shape[1:])
            ours_view[:, kept] = theirs_view[:, source_rows].to(ours.dtype)
            state[key] = ours
    return state


def apply_freeze(model: torch.nn.Module, freeze: str | int) -> None:
    """Stop gradients as `train.freeze` says: "none" leaves the model's own
    `backbone.freeze_at`; "backbone" freezes every ResNet stage, "backbone+fpn" the FPN too;
    an int is torchvision's `trainable_backbone_layers` (that many stages, from the top, train)."""
    if freeze == "none":
        return
    if isinstance(freeze, int):
        model.backbone.freeze(5 - freeze)
        return
    model.backbone.freeze(5)
    if freeze == "backbone+fpn":
        model.fpn.requires_grad_(False)
