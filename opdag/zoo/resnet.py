"""`resnet`: a small CIFAR-style residual network for 32x32 images, returning its loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opdag.zoo import ZooError


@dataclass(frozen=True)
class ResNetConfig:
    """Arguments of the `resnet` model: channel width and block count of each stage."""

    widths: tuple[int, ...] = (16, 32, 64)
    blocks: tuple[int, ...] = (1, 1, 1)
    num_classes: int = 10
    in_channels: int = 3

    def __post_init__(self) -> None:
        if not self.widths:
            raise ZooError("resnet: widths=() must name at least one stage")
        if len(self.widths) != len(self.blocks):
            raise ZooError(
                f"resnet: widths={self.widths} and blocks={self.blocks} must have the same "
                "length (one entry per stage)"
            )
        for arg, values in (("widths", self.widths), ("blocks", self.blocks)):
            if any(v < 1 for v in values):
                raise ZooError(f"resnet: {arg}={values} must all be >= 1")
        for arg, value in (("num_classes", self.num_classes), ("in_channels", self.in_channels)):
            if value < 1:
                raise ZooError(f"resnet: {arg}={value} must be >= 1")


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (identity, or 1x1 conv+bn when the shape
    changes), then relu. Each ReLU is its own module so each is its own graph node."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(branch + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks (each later stage halves the resolution), global average
    pool, linear head; forward(images, labels) returns the cross-entropy."""

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        first = config.widths[0]
        self.stem_conv = nn.Conv2d(config.in_channels, first, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(first)
        self.stem_relu = nn.ReLU()
        stages: list[nn.Module] = []
        in_ch = first
        for s, (width, count) in enumerate(zip(config.widths, config.blocks, strict=True)):
            blocks = []
            for b in range(count):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(BasicBlock(in_ch, width, stride))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_ch, config.num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem_relu(self.stem_bn(self.stem_conv(images)))
        x = self.stages(x)
        logits = self.head(self.flatten(self.pool(x)))
        return F.cross_entropy(logits, labels)
