"""The model zoo: small models whose forward takes one batch and returns the training loss.

Each model is named (`ZOO_NAMES`), configured by a frozen dataclass built from a plain
mapping of arguments (a job spec's `model.args`), and captured by `opdag.capture` like any
other module.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from opdag.errors import OpDagError


class ZooError(OpDagError, ValueError):
    """A model name or argument is unknown, ill-typed or out of range."""


# The model modules import ZooError from here, so they are imported after it exists.
from opdag.zoo.gpt import GPT, GPTConfig  # noqa: E402
from opdag.zoo.mlp import MLP, MLPConfig  # noqa: E402
from opdag.zoo.moe_gpt import MoEGPT, MoEGPTConfig  # noqa: E402
from opdag.zoo.resnet import ResNet, ResNetConfig  # noqa: E402

ModelConfig: typing.TypeAlias = GPTConfig | MoEGPTConfig | ResNetConfig | MLPConfig


@dataclasses.dataclass(frozen=True)
class _Entry:
    """How to configure and build one zoo model, and what batch it eats."""

    config_type: type[Any]
    build: Callable[[Any], nn.Module]
    kind: str  # "text" or "image"


_ZOO: dict[str, _Entry] = {
    "gpt": _Entry(GPTConfig, GPT, "text"),
    "moe-gpt": _Entry(MoEGPTConfig, MoEGPT, "text"),
    "resnet": _Entry(ResNetConfig, ResNet, "image"),
    "mlp": _Entry(MLPConfig, MLP, "image"),
}

ZOO_NAMES: tuple[str, ...] = tuple(_ZOO)

_INPUT_NAMES = {"text": ("tokens", "targets"), "image": ("images", "labels")}


def _entry(name: str) -> _Entry:
    if name not in _ZOO:
        raise ZooError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO_NAMES)}")
    return _ZOO[name]


def _coerce(model: str, arg: str, value: Any, hint: Any) -> Any:
    """Check one argument against its annotated type; widen int to float and list to tuple.

    YAML gives lists where the config wants tuples and `1` where it wants `1.0`; anything
    else of the wrong type is an error rather than a silent conversion.
    """
    bad = ZooError(f"{model}: argument {arg}={value!r} must be of type {_type_name(hint)}")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple | list):
            raise bad
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_coerce(model, arg, v, items[0]) for v in value)
        if len(items) != len(value):
            raise bad
        return tuple(_coerce(model, arg, v, h) for v, h in zip(value, items, strict=True))
    raise TypeError(f"zoo config field {arg} has an unsupported annotation {hint!r}")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not isinstance(hint, types.GenericAlias):
        return hint.__name__
    return str(hint)


def model_config(name: str, args: Mapping[str, Any] | None = None) -> ModelConfig:
    """Build and validate the frozen config of zoo model `name` from a mapping of arguments."""
    entry = _entry(name)
    hints = typing.get_type_hints(entry.config_type)
    fields = [f.name for f in dataclasses.fields(entry.config_type)]
    given = dict(args or {})
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ZooError(
            f"{name}: unknown argument(s) {', '.join(unknown)}; "
            f"valid arguments: {', '.join(fields)}"
        )
    coerced = {k: _coerce(name, k, v, hints[k]) for k, v in given.items()}
    config: ModelConfig = entry.config_type(**coerced)
    return config


def build_model(name: str, args: Mapping[str, Any] | None = None, *, seed: int = 0) -> nn.Module:
    """Build zoo model `name` in training mode, its initial weights a function of `seed` only.

    The global RNG is forked, so building a model neither depends on nor disturbs it.
    """
    config = model_config(name, args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _ZOO[name].build(config)
    return model.train()


def data_kind(name: str) -> str:
    """The kind of data model `name` trains on: "text" or "image"."""
    return _entry(name).kind


def input_names(name: str) -> tuple[str, ...]:
    """The forward's argument names, which are also the keys of a batch dict."""
    return _INPUT_NAMES[data_kind(name)]


def example_batch(
    name: str,
    args: Mapping[str, Any] | None,
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """A batch of zeros shaped and typed as model `name` expects (for tracing and sizing)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ZooError(f"{name}: batch_size={batch_size!r} must be a positive int")
    config = model_config(name, args)
    if isinstance(config, GPTConfig | MoEGPTConfig):
        shape = (batch_size, config.context)
        return {
            "tokens": torch.zeros(shape, dtype=torch.int64, device=device),
            "targets": torch.zeros(shape, dtype=torch.int64, device=device),
        }
    side = 32  # both image models are sized for the 32x32 synthetic-shapes images
    channels = config.in_channels
    return {
        "images": torch.zeros(batch_size, channels, side, side, device=device),
        "labels": torch.zeros(batch_size, dtype=torch.int64, device=device),
    }


__all__ = [
    "GPT",
    "MLP",
    "ZOO_NAMES",
    "GPTConfig",
    "MLPConfig",
    "MoEGPT",
    "MoEGPTConfig",
    "ModelConfig",
    "ResNet",
    "ResNetConfig",
    "ZooError",
    "build_model",
    "data_kind",
    "example_batch",
    "input_names",
    "model_config",
]
