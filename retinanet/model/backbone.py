"""ResNet backbone giving C3, C4, C5 (strides 8, 16, 32)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from .fuse import bn_scale_shift

RESNET_DEPTHS = (18, 34, 50, 101)
_STAGES = ("layer1", "layer2", "layer3", "layer4")


def make_norm_layer(kind: str):
    """The normalisation layer used inside the ResNet: frozen BN (detection default), BN, or GN."""
    if kind == "frozen_bn":
        return FrozenBatchNorm2d
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda channels: nn.GroupNorm(32, channels)
    raise ValueError(f"unknown backbone norm {kind!r} (frozen_bn, bn or gn)")


class ResNetBackbone(nn.Module):
    """A torchvision ResNet trunk without its classifier.

    Module names follow torchvision (`conv1`, `bn1`, `layer1`..`layer4`) so ImageNet
    checkpoints load directly. `forward(x: (N, 3, H, W))` returns `[C3, C4, C5]` with
    `out_channels` channels and strides 8, 16, 32.

    Args:
        depth: 18, 34, 50 or 101.
        norm: "frozen_bn" | "bn" | "gn".
        freeze_at: 0 freezes nothing, 1 the stem, 2 the stem and res2 (layer1), up to 5.
        stride_in_1x1: put the bottleneck's stride on its first 1x1 conv (MSRA / detectron2
            weights) instead of the 3x3 conv (torchvision, PaddleDetection variant b).
    """

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", freeze_at: int = 2, stride_in_1x1: bool = False):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth} (choose from {RESNET_DEPTHS})")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=make_norm_layer(norm))
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        if stride_in_1x1:
            self._move_stride_to_1x1()
        expansion = 4 if depth >= 50 else 1
        self.out_channels = [128 * expansion, 256 * expansion, 512 * expansion]
        self.freeze(freeze_at)

    def _move_stride_to_1x1(self) -> None:
        for stage in _STAGES:
            block = getattr(self, stage)[0]
            if not hasattr(block, "conv3"):
                raise ValueError("stride_in_1x1 applies to bottleneck ResNets (depth 50 or 101)")
            stride = block.conv2.stride
            block.conv2.stride, block.conv1.stride = (1, 1), stride

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (1) and the first `freeze_at - 1` stages; the rest train
        (so a later call can also unfreeze what an earlier one froze)."""
        modules = [self.conv1, self.bn1] + [getattr(self, s) for s in _STAGES]
        self._frozen = modules[: freeze_at + 1] if freeze_at >= 1 else []
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(module not in self._frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ResNetBackbone":
        """Like `nn.Module.train`, but batch statistics in frozen stages stay fixed."""
        super().train(mode)
        for module in getattr(self, "_frozen", []):
            module.train(False)
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(self.bn1, FrozenBatchNorm2d):
            return self._forward_frozen_bn_folded(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

    def _forward_frozen_bn_folded(self, x: torch.Tensor) -> list[torch.Tensor]:
        """`forward` with every FrozenBatchNorm applied as its convolution's weight scale and
        bias (`conv_frozen_bn`): the same function, one pass over each activation instead of
        three (convolution, multiply, add), and the same parameters, so that checkpoints and
        gradients are unchanged (a trainable weight gets its gradient through the scale)."""
        x = self.maxpool(conv_frozen_bn(self.conv1, self.bn1, x).relu_())
        features = []
        for stage in _STAGES:
            for block in getattr(self, stage):
                x = _residual_block(block, x)
            features.append(x)
        return features[1:]


def conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn(conv(x))` as one convolution: weight scaled per output channel, BN's shift as bias
    (`fold_conv_bn` does the same once, in place, for inference)."""
    scale, shift = bn_scale_shift(bn)
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return nn.functional.conv2d(x, conv.weight * scale.view(-1, 1, 1, 1), shift, conv.stride, conv.padding,
                                conv.dilation, conv.groups)


def _residual_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock or Bottleneck with FrozenBatchNorm, through `conv_frozen_bn`."""
    depth = 3 if hasattr(block, "conv3") else 2
    out = x
    for i in range(1, depth + 1):
        out = conv_frozen_bn(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"), out)
        if i < depth:
            out = out.relu_()
    identity = conv_frozen_bn(block.downsample[0], block.downsample[1], x) if block.downsample is not None else x
    return (out + identity).relu_()

