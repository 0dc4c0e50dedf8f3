"""The job spec's trust policy: how much a stage believes of what its peers send it.

Two settings, both the coordinator's policy (a worker is told them in its stage assignment,
so a volunteer cannot turn off the checks that protect the others):

- `values`: the bounds every receiving stage puts on the float values it is sent
  (`worker.value_guard`): a norm at most `factor` times the median of its edge's last
  `window` norms, once the edge carried `warmup` values; every |x| below `ceiling`.
- `spot_checks`: about one in `every` steps of each stage, the coordinator recomputes one
  micro-batch of that stage (forward and backward), chosen after the step ran, from the
  stage's own inputs, parameters and received gradients, and compares the result with what
  the stages it sends to say they received, within `tolerance` (relative to the largest
  |x| of the recomputed value); a mismatch accuses the stage (`coordinator.spot_checks`).
  Each stage keeps what that takes for its last `keep` steps: `keep` copies of its
  parameters and buffers, and those steps' inputs. `every: 0` turns them off.

A spec writes `trust: {values: {factor: 50}, spot_checks: {every: 10}}`; every key may be
left out. Errors name the field (`trust.spot_checks.every: ...`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import PlainValidator

from coordinator.planning.spec_errors import Blame, int_in_range, show, spec_dataclass

# Spot checks by default: about one step in 50 of each stage; 4 steps kept to answer one.
DEFAULT_SPOT_EVERY = 50
DEFAULT_SPOT_KEEP = 4
DEFAULT_SPOT_TOLERANCE = 1e-3
MAX_SPOT_KEEP = 16


def _number_in(lo: float, hi: float, *, open_lo: bool) -> Any:
    def check(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be a number, got {show(value)}")
        x = float(value)
        low_ok = x > lo if open_lo else x >= lo
        if not (math.isfinite(x) and low_ok and x <= hi):
            bracket = "(" if open_lo else "["
            raise ValueError(f"must be in {bracket}{lo:g}, {hi:g}], got {value}")
        return x

    return PlainValidator(check)


@spec_dataclass("trust.values")
class ValueBoundsSpec:
    """The bounds a receiving stage puts on the values it is sent (`worker.value_guard`)."""

    factor: Annotated[float, _number_in(1.0, 1e12, open_lo=True)] = 100.0
    warmup: Annotated[int, PlainValidator(int_in_range(1, 10_000))] = 8
    window: Annotated[int, PlainValidator(int_in_range(1, 10_000))] = 64
    ceiling: Annotated[float, _number_in(0.0, 1e38, open_lo=True)] = 1e30

    def __post_init__(self) -> None:
        if self.window < self.warmup:
            raise Blame(
                f"must be >= warmup ({self.warmup}): the median is taken over the window, "
                f"got {self.window}",
                "window",
            )

    def to_plain(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "warmup": self.warmup,
            "window": self.window,
            "ceiling": self.ceiling,
        }


@spec_dataclass("trust.spot_checks")
class SpotCheckSpec:
    """How often the coordinator recomputes a stage's micro-batch, and how close the result
    must be to what the next stage received."""

    every: Annotated[int, PlainValidator(int_in_range(0, 1_000_000))] = DEFAULT_SPOT_EVERY
    tolerance: Annotated[float, _number_in(0.0, 1.0, open_lo=True)] = DEFAULT_SPOT_TOLERANCE
    keep: Annotated[int, PlainValidator(int_in_range(1, MAX_SPOT_KEEP))] = DEFAULT_SPOT_KEEP

    @property
    def on(self) -> bool:
        return self.every > 0

    def to_plain(self) -> dict[str, Any]:
        return {"every": self.every, "tolerance": self.tolerance, "keep": self.keep}


@spec_dataclass("trust")
class TrustSpec:
    """What stages believe of each other: value bounds and spot checks."""

    values: ValueBoundsSpec = ValueBoundsSpec()
    spot_checks: SpotCheckSpec = SpotCheckSpec()

    def to_plain(self) -> dict[str, Any]:
        return {"values": self.values.to_plain(), "spot_checks": self.spot_checks.to_plain()}


__all__ = [
    "DEFAULT_SPOT_EVERY",
    "DEFAULT_SPOT_KEEP",
    "DEFAULT_SPOT_TOLERANCE",
    "SpotCheckSpec",
    "TrustSpec",
    "ValueBoundsSpec",
]
