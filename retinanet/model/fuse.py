"""Inference-time rewrites that keep the outputs (up to float rounding): BatchNorm folded into
the convolution before it."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A frozen (or eval-mode) BatchNorm as the per-channel affine map it computes:
    `bn(x) == x * scale + shift`, each `(C,)`."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # as FrozenBatchNorm2d computes it
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold a (frozen, or eval-mode) BatchNorm into `conv` in place: `bn(conv(x)) == conv'(x)`."""
    scale, bias = bn_scale_shift(bn)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.clone(), requires_grad=False)
    else:
        conv.bias.mul_(scale).add_(bias)


def fold_backbone_batchnorm(backbone: nn.Module) -> int:
    """Fold every ResNet BatchNorm (frozen, or trainable in eval mode) into its convolution and
    replace it by an identity. Returns how many were folded. For inference only."""
    pairs = [(backbone, "conv1", "bn1")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(backbone, stage):
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"bn{i}")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    folded = 0
    for parent, conv_name, bn_name in pairs:
        bn = getattr(parent, bn_name) if not isinstance(parent, nn.Sequential) else parent[int(bn_name)]
        if not isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)) or (isinstance(bn, nn.BatchNorm2d) and bn.training):
            continue
        conv = getattr(parent, conv_name) if not isinstance(parent, nn.Sequential) else parent[int(conv_name)]
        fold_conv_bn(conv, bn)
        if isinstance(parent, nn.Sequential):
            parent[int(bn_name)] = nn.Identity()
        else:
            setattr(parent, bn_name, nn.Identity())
        folded += 1
    return folded
