"""The job spec's `compression` section: what crosses the cut links, and how.

`compression_setting` reads the spec's value (a name or a mapping) as the `CompressionSpec`
the planner prices (`coordinator.planning.link_compression`); every error names the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainValidator

from coordinator.planning.spec_errors import Form, one_of, section, show

COMPRESSION_KINDS = ("none", "adatopk", "topk")
COMPRESSION_VALUES = ("fp32", "fp16")


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number, got {show(value)}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"must be a fraction in (0, 1], got {value}")
    return value


Fraction = Annotated[float, PlainValidator(_fraction)]


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """What crosses the cut links: everything exactly (`none`), the top-k entries at a
    fraction each link's bandwidth calls for (`adatopk`, never below `floor`), or the top-k
    at one fixed fraction on every cut link (`topk`). `values` is how kept entries travel.
    Built from the spec's `compression`, whose form checks every value."""

    kind: str = "none"
    ratio: float = 1.0  # topk only
    floor: float = 0.01  # adatopk only
    values: str = "fp32"

    def to_plain(self) -> Any:
        if self.kind == "none":
            return "none"
        if self.kind == "topk":
            return {"topk": self.ratio, "values": self.values}
        return {"adatopk": {"floor": self.floor}, "values": self.values}


@section("compression.adatopk")
class _AdaTopKForm(Form):
    floor: Fraction = 0.01


def _adatopk_options(value: object) -> object:
    return {} if value is None or value is True else value  # `{adatopk: }`: the defaults


@section("compression")
class _CompressionForm(Form):
    topk: Fraction = 1.0
    adatopk: Annotated[_AdaTopKForm, BeforeValidator(_adatopk_options)] = _AdaTopKForm()
    values: Annotated[str, PlainValidator(one_of(COMPRESSION_VALUES))] = "fp32"


def compression_setting(value: object) -> object:
    """`none`, `adatopk`, `{adatopk: {floor: F}}` or `{topk: FRACTION}`, each mapping with
    an optional `values: fp32 | fp16`, as the CompressionSpec it describes."""
    if isinstance(value, CompressionSpec):
        return value
    if isinstance(value, str):
        if value == "topk":
            raise ValueError("topk needs its fraction: {topk: 0.05}")
        if value not in COMPRESSION_KINDS:
            raise ValueError(
                f"unknown setting {show(value)} "
                f"(settings: none, adatopk, {{adatopk: {{floor: F}}}}, {{topk: FRACTION}})"
            )
        return CompressionSpec(kind=value)
    form = _CompressionForm.model_validate(value)
    kinds = [k for k in ("topk", "adatopk") if k in form.model_fields_set]
    if len(kinds) != 1:
        raise ValueError(
            f"a mapping names exactly one of topk or adatopk, got {', '.join(kinds) or 'neither'}"
        )
    return CompressionSpec(kinds[0], form.topk, form.adatopk.floor, form.values)
