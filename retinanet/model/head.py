"""The classification and box subnets, shared over pyramid levels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
        return self.classify(features), [_flatten(self.bbox_pred(self.bbox_subnet(f)), 4) for f in features]

    def classify(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Class logits alone, as `forward` gives them."""
        return [_flatten(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features]

    @property
    def regresses_locally(self) -> bool:
        """Whether `regress_at` applies: the box subnet is convolutions and ReLUs only (a
        GroupNorm needs the whole map)."""
        return all(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in self.bbox_subnet)

    def regress_at(self, features: list[torch.Tensor], locations: list[torch.Tensor]) -> torch.Tensor:
        """Box deltas at chosen locations only: `(N, A, 4)`, N the locations of all levels in
        order; `locations[l]` is `(N_l, 3)` long, (image, y, x) on level l. Equal to
        `forward`'s deltas there: each output depends on a (2R+1)^2 window of its level
        (R = the number of 3x3 convolutions), taken with the zero padding the whole map gets,
        and every intermediate position outside the map is zeroed again, as that padding is
        at every layer. In training only the foreground anchors' deltas reach the loss, so
        the box subnet need not run over whole maps (~97% of its work at 800x1216)."""
        convs = [m for m in self.bbox_subnet if isinstance(m, nn.Conv2d)] + [self.bbox_pred]
        radius = len(convs)
        offsets = torch.arange(-radius, radius + 1, device=features[0].device)
        windows, heights, widths = [], [], []
        for feature, loc in zip(features, locations):
            padded = F.pad(feature, (radius,) * 4)
            rows = loc[:, 1, None] + offsets + radius  # (N_l, 2R+1), in padded coordinates
            cols = loc[:, 2, None] + offsets + radius
            windows.append(padded[loc[:, 0, None, None], :, rows[:, :, None], cols[:, None, :]])  # (N_l, 2R+1, 2R+1, C)
            heights.append(torch.full_like(loc[:, 0], feature.shape[-2]))
            widths.append(torch.full_like(loc[:, 0], feature.shape[-1]))
        x = torch.cat(windows).permute(0, 3, 1, 2)  # (N, C, 2R+1, 2R+1), channels-last in memory
        loc, height, width = torch.cat(locations), torch.cat(heights)[:, None], torch.cat(widths)[:, None]
        for depth, conv in enumerate(convs[:-1]):
            x = F.conv2d(x, conv.weight, conv.bias).relu()
            r = radius - 1 - depth  # this output's half-width
            ys = loc[:, 1, None] + offsets[radius - r : radius + r + 1]
            xs = loc[:, 2, None] + offsets[radius - r : radius + r + 1]
            inside = ((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :]
            x = x * inside[:, None].to(x.dtype)
        return F.conv2d(x, convs[-1].weight, convs[-1].bias).view(x.shape[0], convs[-1].out_channels // 4, 4)


def _flatten(x: torch.Tensor, last: int) -> torch.Tensor:
    """(N, A*last, H, W) -> (N, H*W*A, last)."""
    n, _, h, w = x.shape
    return x.view(n, -1, last, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, last)
