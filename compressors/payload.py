"""`Payload`: a compressed tensor that describes itself fully, and checks that it does.

A payload carries the original dtype and shape, an encoding name `"<values>/<indices>"`
(for example `"raw/dense"`, `"fp16/varint"`, `"int8/bitmap"`), the kept count, and its
byte buffers: `values` always, `indices` for sparse encodings, `scales` for int8. Building
one checks every field against the others, so a `Payload` that exists is consistent and a
decoder may size its allocations from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compressors.dtypes import DTYPES, FLOATING
from compressors.errors import PayloadError
from compressors.index_coding import INDEX_FORMATS, index_length_range
from compressors.value_coding import (
    LOSSY_FORMATS,
    SCALE_ITEMSIZE,
    VALUE_FORMATS,
    scale_count,
    value_itemsize,
)

# int32 indices and torch's own limits both stop here; a receiver sets its own lower
# bound on what it is willing to allocate (see `decode_payload`).
MAX_ELEMENTS = 2**31 - 1
MAX_DIMS = 32

ENCODINGS: tuple[str, ...] = tuple(f"{v}/{i}" for v in VALUE_FORMATS for i in INDEX_FORMATS)


def encoding_name(values: str, indices: str) -> str:
    """The encoding name of a value format and an index format."""
    return f"{values}/{indices}"


def split_encoding(encoding: str) -> tuple[str, str]:
    """(value format, index format) of a known encoding name; PayloadError otherwise."""
    if encoding not in ENCODINGS:
        raise PayloadError(f"unknown encoding {encoding!r:.60} (known: {', '.join(ENCODINGS)})")
    values, indices = encoding.split("/")
    return values, indices


def checked_numel(shape: object, max_elements: int = MAX_ELEMENTS) -> int:
    """The element count of a shape, after checking it is at most `max_elements`."""
    if not isinstance(shape, tuple | list):
        raise PayloadError(f"shape must be a list of ints, not {type(shape).__name__}")
    if len(shape) > MAX_DIMS:
        raise PayloadError(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    for dim in shape:
        if not _is_int(dim):
            raise PayloadError(f"shape holds a dimension that is not an int: {dim!r:.40}")
        if dim < 0:
            raise PayloadError(f"shape has a negative dimension {show_int(dim)}")
    # The non-zero dimensions are bounded even when a zero makes the tensor empty: torch
    # refuses a shape whose product overflows, whatever it multiplies out to.
    numel = 1
    for dim in shape:
        numel *= dim or 1
        # Stopping at the first excess keeps a hostile shape from building a huge product.
        if numel > max_elements:
            raise PayloadError(
                f"shape [{', '.join(show_int(d) for d in shape)}] has more than the limit of "
                f"{max_elements} elements"
            )
    return 0 if 0 in shape else numel


def show_int(value: int) -> str:
    """An int for an error message; a hostile one may have too many digits to print."""
    return str(value) if abs(value) < 10**30 else f"{'-' if value < 0 else ''}<huge int>"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Payload:
    """A compressed tensor: what it was (dtype, shape), how it is written, and its bytes."""

    encoding: str
    dtype: str
    shape: tuple[int, ...]
    count: int
    values: bytes
    indices: bytes = b""
    scales: bytes = b""
    chunk: int = 0  # int8 values per scale; 0 for every other value format

    def __post_init__(self) -> None:
        check_payload(self)
        if not isinstance(self.shape, tuple):  # a list passed the check; store it hashable
            object.__setattr__(self, "shape", tuple(self.shape))

    def __repr__(self) -> str:  # the buffers may be megabytes; show their sizes
        return (
            f"Payload({self.encoding}, {self.dtype}{list(self.shape)}, count={self.count}, "
            f"bytes={len(self.values)}+{len(self.indices)}+{len(self.scales)}, "
            f"chunk={self.chunk})"
        )

    @property
    def value_format(self) -> str:
        return self.encoding.split("/")[0]

    @property
    def index_format(self) -> str:
        return self.encoding.split("/")[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_sparse(self) -> bool:
        return self.index_format != "dense"

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers: what the payload costs on the wire, header aside."""
        return len(self.values) + len(self.indices) + len(self.scales)


def check_payload(p: Payload, max_elements: int = MAX_ELEMENTS) -> None:
    """Check every field of a payload against the others; PayloadError names the first fault.

    Only sizes are checked here (cheap, nothing allocated); index content is checked by
    the decoder, which has to read it anyway.
    """
    if not isinstance(p.encoding, str):
        raise PayloadError(f"encoding must be a string, not {type(p.encoding).__name__}")
    values_fmt, index_fmt = split_encoding(p.encoding)
    if not isinstance(p.dtype, str) or p.dtype not in DTYPES:
        raise PayloadError(f"unknown dtype {p.dtype!r:.40} (supported: {', '.join(DTYPES)})")
    numel = checked_numel(p.shape, max_elements)
    if not _is_int(p.count) or p.count < 0:
        raise PayloadError(f"count must be a non-negative int, not {p.count!r:.40}")
    if p.count > numel:
        raise PayloadError(f"count {show_int(p.count)} exceeds the tensor's {numel} elements")
    if p.dtype not in FLOATING and (values_fmt in LOSSY_FORMATS or index_fmt != "dense"):
        raise PayloadError(f"encoding {p.encoding} cannot carry a {p.dtype} tensor")
    if index_fmt == "dense" and p.count != numel:
        raise PayloadError(
            f"a dense encoding must keep all {numel} elements, header says {p.count}"
        )
    for name in ("values", "indices", "scales"):
        if not isinstance(getattr(p, name), bytes):
            raise PayloadError(f"{name} must be bytes, not {type(getattr(p, name)).__name__}")
    _check_chunk(p.chunk, values_fmt)

    expected = p.count * value_itemsize(values_fmt, p.dtype)
    if len(p.values) != expected:
        raise PayloadError(
            f"values hold {len(p.values)} bytes; {p.count} {values_fmt} values of a {p.dtype} "
            f"tensor need {expected}"
        )
    low, high = index_length_range(index_fmt, p.count, numel)
    if not low <= len(p.indices) <= high:
        need = f"{low}" if low == high else f"{low} to {high}"
        raise PayloadError(
            f"indices hold {len(p.indices)} bytes; {p.count} {index_fmt} indices into "
            f"{numel} elements need {need}"
        )
    scales = scale_count(values_fmt, p.count, p.chunk) * SCALE_ITEMSIZE
    if len(p.scales) != scales:
        raise PayloadError(f"scales hold {len(p.scales)} bytes, the header implies {scales}")


def _check_chunk(chunk: object, values_fmt: str) -> None:
    if not isinstance(chunk, int) or isinstance(chunk, bool):
        raise PayloadError(f"chunk must be an int, not {type(chunk).__name__}")
    if values_fmt == "int8" and not 1 <= chunk <= MAX_ELEMENTS:
        raise PayloadError(
            f"int8 values need a chunk in [1, {MAX_ELEMENTS}], header says {show_int(chunk)}"
        )
    if values_fmt != "int8" and chunk != 0:
        raise PayloadError(
            f"chunk must be 0 for {values_fmt} values, header says {show_int(chunk)}"
        )
