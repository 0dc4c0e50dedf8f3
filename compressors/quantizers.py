"""Dense compressors: every element sent, as it is, in fp16, or in int8 with scales."""

from __future__ import annotations

from typing import ClassVar

import torch

from compressors.compressor import Compressor, check_chunk
from compressors.dtypes import FLOATING, dtype_name
from compressors.encoding import encode_dense
from compressors.payload import Payload
from compressors.value_coding import DEFAULT_INT8_CHUNK


class NoCompression(Compressor):
    """The identity: the tensor's own bytes, bit for bit (NaN payloads and -0.0 included)."""

    name: ClassVar[str] = "none"

    def compress(self, x: torch.Tensor) -> Payload:
        return encode_dense(x)

    def spec(self) -> dict[str, object]:
        return {"name": self.name}


class Fp16Quantizer(Compressor):
    """Every element as fp16: relative error at most 2**-11 in fp16's normal range, values
    past ±65504 saturated."""

    name: ClassVar[str] = "fp16"

    def compress(self, x: torch.Tensor) -> Payload:
        if dtype_name(x.dtype) not in FLOATING:
            return encode_dense(x)
        return encode_dense(x, "fp16")

    def spec(self) -> dict[str, object]:
        return {"name": self.name}


class Int8Quantizer(Compressor):
    """Every element as int8 with one fp32 scale per `chunk` elements (None: per tensor);
    each element is off by at most half its chunk's scale, max |x| / 127."""

    name: ClassVar[str] = "int8"

    def __init__(self, *, chunk: int | None = DEFAULT_INT8_CHUNK) -> None:
        self.chunk = check_chunk(chunk)

    def compress(self, x: torch.Tensor) -> Payload:
        if dtype_name(x.dtype) not in FLOATING:
            return encode_dense(x)
        return encode_dense(x, "int8", self.chunk)

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "chunk": self.chunk}
