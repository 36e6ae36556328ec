"""What every converter shares: permuting predictor channels, filling our state dict."""

from __future__ import annotations

import re
from typing import Callable, Union

import torch

from ..model.config import ModelConfig
from ..model.detector import RetinaNet


class ConversionError(ValueError):
    """The source file is not what the converter expects; the message says why."""


# A renaming rule: a regular expression matched against the whole source key, and what the
# key becomes: a `re` replacement template, a function of the match, or None (drop the key).
RenameRule = tuple[str, Union[str, Callable[[re.Match], str], None]]


def rename_keys(keys, rules: list[RenameRule]) -> dict[str, str]:
    """`{source key: our key}` for every key the first matching rule keeps. Keys that no rule
    matches keep their name (and are then reported as unused by `fill_state_dict`)."""
    compiled = [(re.compile(pattern), target) for pattern, target in rules]
    out = {}
    for key in keys:
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if target is not None:
                out[key] = target(match) if callable(target) else match.expand(target)
            break
        else:
            out[key] = key
    return out


_DEPTH_BY_RES4_BLOCKS = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101}


def resnet_depth(res4_blocks: int, bottleneck: bool) -> int:
    """ResNet depth from the number of blocks in its res4 stage and the block type."""
    depth = _DEPTH_BY_RES4_BLOCKS.get((res4_blocks, bottleneck))
    if depth is None:
        raise ConversionError(f"unsupported ResNet: {res4_blocks} res4 blocks, bottleneck={bottleneck}")
    return depth


def anchors_per_location(box_predictor_weight: torch.Tensor) -> int:
    num_anchors = box_predictor_weight.shape[0] // 4
    if num_anchors != 9:
        raise ConversionError(f"expected 9 anchors per location, found {num_anchors}")
    return num_anchors


def permute_anchor_channels(value: torch.Tensor, perm: list[int], per_anchor: int) -> torch.Tensor:
    """Reorder a predictor's `(A * per_anchor, ...)` output channels anchor-wise by `perm`."""
    shape = value.shape
    return value.reshape(len(perm), per_anchor, *shape[1:])[perm].reshape(shape)


def fill_state_dict(config: ModelConfig, weights: dict[str, torch.Tensor], num_classes: int | None, source: str):
    """Check `weights` against a freshly built model of `config` and return `(config, state)`.

    Every key of ours must be provided and every provided key must be used. With
    `num_classes` different from the source's, the class predictor is left freshly
    initialised (for fine-tuning) and the config's class count changed.
    """
    if num_classes is not None and num_classes != config.num_classes:
        config.num_classes, config.class_names, config.category_ids = num_classes, [], []
        weights = {k: v for k, v in weights.items() if not k.startswith("head.cls_score.")}
    model = RetinaNet.from_config(config)
    state = model.state_dict()
    missing = [k for k in state if k not in weights and not _fresh_ok(k, num_classes is not None)]
    unused = [k for k in weights if k not in state]
    if unused:
        raise ConversionError(f"{source} weights hold keys this architecture does not use, e.g. {unused[:3]}")
    if missing:
        raise ConversionError(f"{source} weights lack parameters this architecture needs, e.g. {missing[:3]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ConversionError(f"{source} weight {key}: shape {tuple(value.shape)}, expected {tuple(state[key].shape)}")
        state[key] = value.to(state[key].dtype).clone()
    return config, state


def _fresh_ok(key: str, new_classes: bool) -> bool:
    """Keys a converted model may keep at their initial value."""
    return key == "loss.ema_num_foreground" or (new_classes and key.startswith("head.cls_score."))
