"""Feature pyramid: P3-P5 from C3-C5 (lateral 1x1, top-down nearest upsampling, 3x3 output),
P6 by a stride-2 3x3 conv on C5 (or P5), P7 by a stride-2 3x3 conv on ReLU(P6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """`forward([C3, C4, C5])` returns `[P3, P4, P5, P6, P7]`, each `(N, out_channels, Hi, Wi)`.

    Args:
        in_channels: channels of C3, C4, C5.
        out_channels: channels of every P level.
        p6_source: "c5" (paper, detectron2) or "p5" (torchvision v1, PaddleDetection).
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256, p6_source: str = "c5"):
        super().__init__()
        if p6_source not in ("c5", "p5"):
            raise ValueError(f"p6_source must be 'c5' or 'p5', got {p6_source!r}")
        self.p6_source = p6_source
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        p6_in = in_channels[-1] if p6_source == "c5" else out_channels
        self.p6 = nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, a=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        top_down = self.lateral_convs[-1](features[-1])
        outputs = [self.output_convs[-1](top_down)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output_convs[i](top_down))
        p6 = self.p6(features[-1] if self.p6_source == "c5" else outputs[-1])
        p7 = self.p7(F.relu(p6))
        return outputs + [p6, p7]
