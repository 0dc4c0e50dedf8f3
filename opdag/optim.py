"""Optimizers for whole models and for pipeline stages.

Every update is a function of one parameter's own state, so a model's parameters split
across one optimizer per stage step exactly as one optimizer over all of them would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from opdag.errors import OpDagError

OPTIMIZER_NAMES: tuple[str, ...] = ("adamw", "adam", "sgd")


class OptimizerError(OpDagError, ValueError):
    """An optimizer config is invalid."""


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer and its hyper-parameters; `betas` serve adam(w), `momentum` sgd.

    Weight decay applies to matrices (ndim >= 2) only, never to biases or norm gains.
    """

    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise OptimizerError(
                f"optimizer: name={self.name!r} is unknown; names: {', '.join(OPTIMIZER_NAMES)}"
            )
        # A job spec gives betas as a YAML list; store the tuple the annotation promises.
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        for field in ("lr", "weight_decay", "momentum"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise OptimizerError(f"optimizer: {field}={value!r} must be a number")
            if not math.isfinite(value):
                raise OptimizerError(f"optimizer: {field}={value!r} must be finite")
        if not self.lr > 0:
            raise OptimizerError(f"optimizer: lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise OptimizerError(f"optimizer: weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise OptimizerError(f"optimizer: momentum={self.momentum} must be in [0, 1)")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(
                isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1
                for b in self.betas
            )
        ):
            raise OptimizerError(
                f"optimizer: betas={self.betas!r} must be two numbers, each in [0, 1)"
            )


def _parameters(
    params: Iterable[tuple[str, nn.Parameter]] | Iterable[nn.Parameter],
) -> list[nn.Parameter]:
    result: list[nn.Parameter] = []
    for item in params:
        param = item[1] if isinstance(item, tuple) else item
        if not isinstance(param, torch.Tensor):
            raise OptimizerError(f"build_optimizer: {type(param).__name__} is not a parameter")
        result.append(param)
    return result


def build_optimizer(
    params: Iterable[tuple[str, nn.Parameter]] | Iterable[nn.Parameter],
    cfg: OptimizerConfig,
) -> torch.optim.Optimizer:
    """An optimizer over `params` (bare or as (name, param) pairs, e.g. named_parameters()).

    Uses the per-parameter (foreach=False) kernels, so results do not depend on how the
    parameters are grouped. A stage without parameters needs no optimizer: passing none is
    an error.
    """
    trainable = [p for p in _parameters(params) if p.requires_grad]
    if not trainable:
        raise OptimizerError("build_optimizer: no trainable parameters were given")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [
        {"params": group, "weight_decay": wd}
        for group, wd in ((decay, cfg.weight_decay), (no_decay, 0.0))
        if group
    ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=False)
