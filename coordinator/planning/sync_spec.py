"""The job spec's sync policy: how the replicas of a stage keep their parameters together.

`sync` averages the replicas' gradients every step, so a run equals one process training the
full batch. `local-sgd` lets each replica step its own optimizer and averages parameters
every `period` steps; `partial-local-sgd` (DreamDDP) averages every layer once per period,
each at its own iteration of the period (`sync_schedule` picks which). `values` is how
averaged tensors travel, and `outer`, for the local kinds, replaces plain parameter
averaging by an outer optimizer stepping on the averaged pseudo-gradient, as DiLoCo does.
`aggregate` is how the shares are combined: `mean`, or, against a bad replica, `median` or
`trimmed-mean` (coordinate-wise, after leaving out a share far from the group's median).

A spec writes `sync: KIND` or `sync: {kind: KIND, period: H, values: fp16, outer: {...},
aggregate: median}`; `JobSpec.sync` is the `SyncSpec` it describes. Errors name the field
(`sync.period: ...`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, PlainValidator, StrictStr

from coordinator.planning.spec_errors import Blame, int_in_range, one_of, show, spec_dataclass

SYNC_KINDS: tuple[str, ...] = ("sync", "local-sgd", "partial-local-sgd")
SYNC_VALUES: tuple[str, ...] = ("fp32", "fp16")
# How a group's shares are combined (`worker.robust_aggregate`): the robust two refuse an
# outlier share and name its sender, with three replicas or more.
SYNC_AGGREGATES: tuple[str, ...] = ("mean", "median", "trimmed-mean")
OUTER_OPTIMIZERS: tuple[str, ...] = ("sgd", "nesterov")
# Steps between averages of the local kinds; `sync` averages every step and ignores it.
DEFAULT_PERIOD = 8
MAX_PERIOD = 10_000
# DiLoCo's outer optimizer settings, the defaults when `outer` names only the optimizer.
DEFAULT_OUTER_LR = 0.7
DEFAULT_OUTER_MOMENTUM = 0.9


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value}")
    # Whole numbers become floats so equal settings compare and print alike.
    return float(value)


def _outer_lr(value: object) -> float:
    lr = _number(value)
    if lr <= 0:
        raise ValueError(f"must be > 0, got {lr}")
    return lr


def _outer_momentum(value: object) -> float:
    momentum = _number(value)
    if not 0 <= momentum < 1:
        raise ValueError(f"must be in [0, 1), got {momentum}")
    return momentum


def _sync_kind(value: object) -> str:
    if isinstance(value, str) and value in SYNC_KINDS:
        return value
    raise ValueError(f"unknown sync kind {show(value)} (kinds: {', '.join(SYNC_KINDS)})")


@spec_dataclass("sync.outer")
class OuterSpec:
    """The outer optimizer of local SGD: at each sync, the replicas' mean pseudo-gradient
    (parameters at the last sync minus parameters now) is stepped by `name` (heavy-ball
    `sgd` or `nesterov`) with `lr` and `momentum`, instead of taking the mean parameters."""

    name: Annotated[StrictStr, AfterValidator(one_of(OUTER_OPTIMIZERS))]
    lr: Annotated[float, PlainValidator(_outer_lr)] = DEFAULT_OUTER_LR
    momentum: Annotated[float, PlainValidator(_outer_momentum)] = DEFAULT_OUTER_MOMENTUM

    def to_plain(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "momentum": self.momentum}


@spec_dataclass("sync")
class SyncSpec:
    """How a stage's replicas are kept together: `kind`, the `period` in steps of the local
    kinds, the wire `values` of averaged tensors, and the `outer` optimizer of the local
    kinds (None: plain parameter averaging). The default is `sync`, exact and every step."""

    kind: Annotated[str, PlainValidator(_sync_kind)] = "sync"
    period: Annotated[int, PlainValidator(int_in_range(1, MAX_PERIOD))] = DEFAULT_PERIOD
    values: Annotated[str, PlainValidator(one_of(SYNC_VALUES))] = "fp32"
    outer: OuterSpec | None = None
    aggregate: Annotated[str, PlainValidator(one_of(SYNC_AGGREGATES))] = "mean"

    def __post_init__(self) -> None:
        if self.outer is not None and self.kind == "sync":
            raise Blame(
                "only local-sgd and partial-local-sgd take an outer optimizer "
                "(sync averages gradients, not parameters)",
                "outer",
            )

    @property
    def local(self) -> bool:
        """Whether replicas step their own optimizers between averages."""
        return self.kind != "sync"

    def to_plain(self) -> dict[str, Any]:
        """The policy as plain data; `sync_setting` (and so the spec) reads it back."""
        plain: dict[str, Any] = {"kind": self.kind, "period": self.period, "values": self.values}
        if self.outer is not None:
            plain["outer"] = self.outer.to_plain()
        if self.aggregate != "mean":
            plain["aggregate"] = self.aggregate
        return plain


def sync_setting(value: object) -> object:
    """The spec's `sync` as SyncSpec reads it: `sync: KIND` is short for `{kind: KIND}`, and
    a mapping must name its kind (a period alone would silently mean `sync`)."""
    if isinstance(value, str):
        return {"kind": _sync_kind(value)}
    if isinstance(value, dict) and "kind" not in value:
        raise Blame("missing; sync needs: kind", "kind")
    return value


__all__ = [
    "DEFAULT_PERIOD",
    "MAX_PERIOD",
    "OUTER_OPTIMIZERS",
    "SYNC_AGGREGATES",
    "SYNC_KINDS",
    "SYNC_VALUES",
    "OuterSpec",
    "SyncSpec",
    "sync_setting",
]
