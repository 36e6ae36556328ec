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

    def forward(self, features: list[torch.Tensor], flatten: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`flatten=False`: the class logits as `classify` gives them unflattened."""
        return self.classify(features, flatten), [_flatten(self.bbox_pred(self.bbox_subnet(f)), 4) for f in features]

    def classify(self, features: list[torch.Tensor], flatten: bool = True) -> list[torch.Tensor]:
        """Class logits alone, as `forward` gives them; `flatten=False`: each level as a
        `(N, Hi, Wi, A, num_classes)` view of the predictor's output, the same order without
        the copy that flattening an NCHW map takes (and its mirror in the backward pass)."""
        maps = [_anchor_view(self.cls_score(self.cls_subnet(f)), self.num_classes) for f in features]
        return [m.flatten(1, 3) for m in maps] if flatten else maps

    @property
    def regresses_locally(self) -> bool:
        """Whether `regress_at` applies: the box subnet is convolutions and ReLUs only (a
        GroupNorm needs the whole map)."""
        return all(isinstance(m, (nn.Conv2d, nn.ReLU)) for m in self.bbox_subnet)

    def regress_at(self, features: list[torch.Tensor], locations: list[torch.Tensor], block: int = 4,
                   whole_maps_when_cheaper: bool = True) -> torch.Tensor:
        """Box deltas at chosen locations only: `(N, A, 4)`, N the locations of all levels in
        order; `locations[l]` is `(N_l, 3)` long, (image, y, x) on level l. Equal to
        `forward`'s deltas there. Each output depends on a (2R+1)^2 window of its level
        (R = the number of 3x3 convolutions): the subnet runs on the windows of the
        `block` x `block` tiles of locations that hold a chosen one (neighbouring locations
        share most of their windows), taken with the zero padding the whole map gets, and
        every intermediate position outside the map is zeroed again, as that padding is at
        every layer. In training only the foreground anchors' deltas reach the loss, so the
        box subnet need not run over whole maps (~97% of its work at 800x1216 when objects
        are few).

        Windows overlap: where chosen locations are dense (hundreds of objects per image),
        a level's windows hold many times its positions. With `whole_maps_when_cheaper`, such
        a level (`windows_cost_more`) runs the subnet over its whole map instead and reads
        the chosen locations there, so that memory and time stay those of `forward` however
        many objects there are."""
        convs = [m for m in self.bbox_subnet if isinstance(m, nn.Conv2d)] + [self.bbox_pred]
        radius, device = len(convs), features[0].device
        span = torch.arange(block + 2 * radius, device=device)  # a tile's window, from its corner - R
        windows, tiles, picks, sizes, first_tile = [], [], [], [], 0
        per_level: list[torch.Tensor | None] = []  # deltas of the levels run whole; None: run locally
        for feature, loc in zip(features, locations):
            height, width = feature.shape[-2:]
            tiles_down, tiles_across = -(-height // block), -(-width // block)
            key = (loc[:, 0] * tiles_down + loc[:, 1] // block) * tiles_across + loc[:, 2] // block
            keys, tile_of = torch.unique(key, return_inverse=True)  # the tiles that hold a location
            if whole_maps_when_cheaper and len(keys) and windows_cost_more(len(keys), block, radius,
                                                                            feature.shape[0] * height * width):
                whole = self.bbox_pred(self.bbox_subnet(feature))
                per_level.append(whole[loc[:, 0], :, loc[:, 1], loc[:, 2]])
                continue
            per_level.append(None)
            image = keys // (tiles_down * tiles_across)
            corner = torch.stack([keys // tiles_across % tiles_down, keys % tiles_across], 1) * block
            padded = F.pad(feature, (radius, radius + block, radius, radius + block))
            rows, cols = corner[:, :1] + span, corner[:, 1:] + span  # (M_l, T+2R), padded coordinates
            windows.append(padded[image[:, None, None], :, rows[:, :, None], cols[:, None, :]])
            picks.append(torch.stack([first_tile + tile_of, loc[:, 1] % block, loc[:, 2] % block], 1))
            tiles.append(corner)
            sizes.append(torch.tensor([height, width], device=device).expand(len(corner), 2))
            first_tile += len(corner)
        if windows:
            local = iter(self._regress_windows(torch.cat(windows), torch.cat(tiles), torch.cat(sizes),
                                               torch.cat(picks), convs, span).split([len(p) for p in picks]))
            per_level = [next(local) if deltas is None else deltas for deltas in per_level]
        return torch.cat(per_level).view(-1, convs[-1].out_channels // 4, 4)

    @staticmethod
    def _regress_windows(windows: torch.Tensor, corner: torch.Tensor, size: torch.Tensor, pick: torch.Tensor,
                         convs: list[nn.Conv2d], span: torch.Tensor) -> torch.Tensor:
        """`regress_at`'s local pass: `windows (M, T+2R, T+2R, C)` around tiles whose corners
        are `corner (M, 2)` on maps of `size (M, 2)`; the predictor's `(P, A*4)` outputs at
        `pick (P, 3)` (tile, y, x in the tile)."""
        radius, block = len(convs), len(span) - 2 * len(convs)
        x = windows.permute(0, 3, 1, 2)  # (M, C, T+2R, T+2R), channels-last in memory
        for depth, conv in enumerate(convs[:-1]):
            margin = radius - 1 - depth  # how far this output reaches beyond its tile
            along = span[: block + 2 * margin] - margin
            ys, xs = corner[:, :1] + along, corner[:, 1:] + along
            inside = ((ys >= 0) & (ys < size[:, :1]))[:, :, None] & ((xs >= 0) & (xs < size[:, 1:]))[:, None, :]
            # zeroing before the ReLU equals zeroing after it; in place, each layer keeps one
            # activation for the backward pass (as the whole-map subnet does), not three
            x = F.conv2d(x, conv.weight, conv.bias).mul_(inside[:, None].to(x.dtype)).relu_()
        out = F.conv2d(x, convs[-1].weight, convs[-1].bias)  # (M, A*4, T, T)
        return out[pick[:, 0], :, pick[:, 1], pick[:, 2]]


def windows_cost_more(tiles: int, block: int, radius: int, positions: int) -> bool:
    """Whether `regress_at`'s windows around `tiles` tiles of `block` x `block` locations keep
    more activations for the backward pass than a subnet of `radius` convolutions (the
    predictor included) over the whole level of `positions` (batch x height x width): each
    window keeps its (T+2m)^2 inputs at margins m = R..1, the whole map its R-1 intermediate
    maps (its input is the level itself). Fewer activations are also less work."""
    per_tile = sum((block + 2 * margin) ** 2 for margin in range(1, radius + 1))
    return tiles * per_tile > (radius - 1) * positions


def _anchor_view(x: torch.Tensor, last: int) -> torch.Tensor:
    """(N, A*last, H, W) -> a (N, H, W, A, last) view."""
    n, _, h, w = x.shape
    return x.view(n, -1, last, h, w).permute(0, 3, 4, 1, 2)


def _flatten(x: torch.Tensor, last: int) -> torch.Tensor:
    """(N, A*last, H, W) -> (N, H*W*A, last)."""
    return _anchor_view(x, last).flatten(1, 3)
