"""Optimizers for whole models and for pipeline stages.

Every update is a function of one parameter's own state, so a model's parameters split
across one optimizer per stage step exactly as one optimizer over all of them would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opdag.errors import OpDagError
from opdag.ir import Graph

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


# Optimizer state travels (to checkpoints, to a new worker) as named tensors, never pickled:
# "optim/<parameter name>/<state key>", e.g. "optim/blocks.0.mlp.fc.weight/exp_avg".
OPTIM_PREFIX = "optim/"


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """A copy of the optimizer's per-parameter state as named tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, param in named_params:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{OPTIM_PREFIX}{name}/{key}"] = value.detach().clone()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{OPTIM_PREFIX}{name}/{key}"] = torch.tensor(float(value), dtype=torch.float64)
    return out


def max_state_bytes(graph: Graph) -> int:
    """The most bytes of tensors a stage's state may bring on the wire (a stage handed to
    a worker, a checkpoint uploaded): its parameters and buffers, at most two optimizer
    tensors per parameter (adam's moments), and 1 MiB of slack (their scalar step counts)."""
    return 3 * sum(p.nbytes for p in graph.params) + (1 << 20)


def optimizer_param_name(tensor_name: str) -> str | None:
    """The parameter an optimizer-state tensor belongs to (None if it is not one)."""
    if not tensor_name.startswith(OPTIM_PREFIX):
        return None
    param, sep, _ = tensor_name[len(OPTIM_PREFIX) :].rpartition("/")
    return param if sep and param else None


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Iterable[tuple[str, nn.Parameter]],
    tensors: Mapping[str, torch.Tensor],
) -> None:
    """Restore per-parameter state written by `optimizer_state_tensors`."""
    params = dict(named_params)
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, value in tensors.items():
        owner = optimizer_param_name(tensor_name)
        if owner is None or owner not in params:
            raise OptimizerError(f"optimizer state {tensor_name!r} belongs to no parameter here")
        key = tensor_name.rpartition("/")[2]
        per_param.setdefault(owner, {})[key] = value
    for name, entries in per_param.items():
        param = params[name]
        state: dict[str, Any] = {}
        for key, value in entries.items():
            if key == "step" and value.dtype == torch.float64 and value.dim() == 0:
                state[key] = value.to(torch.float32)
            elif key != "step" and value.shape != param.shape:
                raise OptimizerError(
                    f"optimizer state {key!r} of {name!r} has shape {list(value.shape)}, "
                    f"the parameter {list(param.shape)}"
                )
            else:
                state[key] = value.clone().to(param.device)
        optimizer.state[param] = state
