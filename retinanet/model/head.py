"""The classification and box subnets, shared over pyramid levels."""

from __future__ import annotations

import math

import torch
from torch import nn


def group_norm_groups(channels: int, most: int = 32) -> int:
    """GroupNorm groups for `channels`: 32 as in torchvision's v2 head where the channels
    allow it, else the most groups that divide the channels with two or more channels in
    each (one channel a group would normalise a 1x1 map, e.g. P7 of a 64 px tile, to zero)."""
    return max([g for g in range(1, most + 1) if channels % g == 0 and channels // g >= 2], default=1)


def _subnet(channels: int, num_convs: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=norm == "none"))
        if norm == "gn":
            layers.append(nn.GroupNorm(group_norm_groups(channels), channels))
        elif norm != "none":
            raise ValueError(f"unknown head norm {norm!r} (none or gn)")
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class RetinaNetHead(nn.Module):
    """Two subnets of `num_convs` x (3x3 conv [+ GroupNorm] + ReLU), then 3x3 predictors.

    `forward(features)` takes `[P3..P7]` and returns two lists, one entry per level:
    class logits `(N, Hi*Wi*A, num_classes)` and box deltas `(N, Hi*Wi*A, 4)`, flattened
    location-major, anchor-minor (the order of `AnchorGenerator`).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: str = "none", prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_subnet = _subnet(in_channels, num_convs, norm)
        self.bbox_subnet = _subnet(in_channels, num_convs, norm)
        self.cls_score = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Start every anchor at foreground probability `prior_prob` so that the many easy
        # negatives do not swamp the loss in the first iterations.
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits = [_flatten(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features]
        deltas = [_flatten(self.bbox_pred(self.bbox_subnet(f)), 4) for f in features]
        return logits, deltas


def _flatten(x: torch.Tensor, last: int) -> torch.Tensor:
    """(N, A*last, H, W) -> (N, H*W*A, last)."""
    n, _, h, w = x.shape
    return x.view(n, -1, last, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, last)
