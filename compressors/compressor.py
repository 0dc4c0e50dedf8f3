"""The one interface every compressor implements, and the checks their settings share."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from compressors.encoding import DEFAULT_MAX_ELEMENTS, decode_payload
from compressors.payload import MAX_ELEMENTS, Payload
from compressors.value_coding import VALUE_FORMATS


class Compressor(abc.ABC):
    """Turns a tensor into a `Payload` and a payload back into a tensor.

    Decompression needs nothing but the payload (it describes itself), so any compressor,
    or `decode_payload` alone, decodes what any other produced. Integer and bool tensors
    (token ids, masks) are never made lossy: every compressor sends them unchanged.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def compress(self, x: torch.Tensor) -> Payload:
        """The payload of `x`."""

    def decompress(
        self, payload: Payload, *, max_elements: int = DEFAULT_MAX_ELEMENTS
    ) -> torch.Tensor:
        """The tensor of a payload; see `decode_payload`."""
        return decode_payload(payload, max_elements=max_elements)

    @abc.abstractmethod
    def spec(self) -> dict[str, object]:
        """The settings that rebuild this compressor with `build_compressor`."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({settings})"


def check_ratio(ratio: object) -> float:
    """A kept fraction in (0, 1]; ValueError naming the field otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float):
        raise ValueError(f"ratio: must be a number in (0, 1], not {ratio!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio: {ratio} is out of range (0, 1]")
    return float(ratio)


def check_values(values: object) -> str:
    """A value format name; ValueError naming the field otherwise."""
    if values not in VALUE_FORMATS:
        raise ValueError(f"values: unknown format {values!r} (formats: {', '.join(VALUE_FORMATS)})")
    assert isinstance(values, str)
    return values


def check_chunk(chunk: object) -> int | None:
    """Elements per int8 scale (None: one scale per tensor); ValueError naming the field."""
    if chunk is None:
        return None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_ELEMENTS:
        raise ValueError(f"chunk: must be None or an int in [1, {MAX_ELEMENTS}], not {chunk!r}")
    return chunk


def check_seed(seed: object) -> int:
    """A non-negative int seed; ValueError naming the field otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, not {seed!r}")
    return seed
