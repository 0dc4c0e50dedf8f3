"""`mlp`: a multilayer perceptron classifier on flattened images, returning its loss."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opdag.zoo import ZooError

IMAGE_PIXELS = 32 * 32  # the zoo's image models eat 32x32 images


@dataclass(frozen=True)
class MLPConfig:
    """Arguments of the `mlp` model; `layers` counts Linear layers, the head included."""

    in_features: int = 3 * IMAGE_PIXELS
    hidden: int = 256
    layers: int = 3
    num_classes: int = 10

    def __post_init__(self) -> None:
        for arg, value in (
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("num_classes", self.num_classes),
        ):
            if value < 1:
                raise ZooError(f"mlp: {arg}={value} must be >= 1")
        if self.in_features < 1 or self.in_features % IMAGE_PIXELS:
            raise ZooError(
                f"mlp: in_features={self.in_features} must be channels*32*32 "
                "(a positive multiple of 1024) to fit 32x32 images"
            )

    @property
    def in_channels(self) -> int:
        """Image channels implied by in_features."""
        return self.in_features // IMAGE_PIXELS


class MLP(nn.Module):
    """Flatten, (Linear, ReLU) x (layers - 1), Linear head; forward(images, labels) returns
    the cross-entropy."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.flatten = nn.Flatten()
        widths = [config.in_features] + [config.hidden] * (config.layers - 1)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(config.layers - 1))
        self.head = nn.Linear(widths[-1], config.num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.flatten(images)
        for linear, act in zip(self.hidden, self.acts, strict=True):
            x = act(linear(x))
        return F.cross_entropy(self.head(x), labels)
