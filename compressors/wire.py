"""A payload on the wire: a flat header of plain ints and strings, and one byte string.

The header names every field of the payload and the length of each buffer; the data is
the buffers back to back (values, indices, scales). Nothing is pickled. Reading checks
the header's types and lengths before slicing anything, and the payload checks every
field against the others, so hostile input is refused with `PayloadError` before any
allocation sized from it.

A gradient sent back along a sparsified edge travels *masked*: only the values at the
entries its forward payload kept, with the positions left out (the receiver holds them
from that forward payload). Its header's index format is `MASKED` and it declares no
index bytes; `masked_payload_from_wire` takes the positions from the forward payload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, TypedDict

import torch

from compressors.encoding import DEFAULT_MAX_ELEMENTS, decode_payload
from compressors.errors import PayloadError
from compressors.payload import Payload, checked_numel, show_int

WIRE_VERSION = 1
# The index format of a masked payload's header: its positions are left out.
MASKED: Final = "mask"
BUFFERS: tuple[str, ...] = ("values", "indices", "scales")
HEADER_FIELDS: tuple[str, ...] = (
    "version",
    "encoding",
    "dtype",
    "shape",
    "count",
    "chunk",
    *(f"{b}_bytes" for b in BUFFERS),
)


class WireHeader(TypedDict):
    """The header of a payload on the wire (a plain dict: ints, strings, a list of ints)."""

    version: int
    encoding: str  # "VALUES/INDICES"; INDICES is MASKED for a masked payload
    dtype: str
    shape: list[int]
    count: int
    chunk: int
    values_bytes: int
    indices_bytes: int
    scales_bytes: int


def payload_to_wire(payload: Payload) -> tuple[WireHeader, bytes]:
    """The header and data bytes of a payload."""
    header = _header(payload, payload.encoding, payload.shape, len(payload.indices))
    return header, payload.values + payload.indices + payload.scales


def masked_payload_to_wire(
    payload: Payload, shape: Sequence[int] | None = None
) -> tuple[WireHeader, bytes]:
    """The header and data bytes of a payload's values and scales, its positions left out.

    `shape` is the dense shape the values belong to (by default the payload's own): a
    gradient at its forward's kept entries is a dense payload of just those entries.
    """
    encoding = f"{payload.value_format}/{MASKED}"
    header = _header(payload, encoding, payload.shape if shape is None else shape, 0)
    return header, payload.values + payload.scales


def _header(payload: Payload, encoding: str, shape: Sequence[int], indices: int) -> WireHeader:
    return WireHeader(
        version=WIRE_VERSION,
        encoding=encoding,
        dtype=payload.dtype,
        shape=list(shape),
        count=payload.count,
        chunk=payload.chunk,
        values_bytes=len(payload.values),
        indices_bytes=indices,
        scales_bytes=len(payload.scales),
    )


def payload_from_wire(
    header: Mapping[str, object],
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Payload:
    """The payload a header and its data describe; PayloadError names what is wrong."""
    _check_fields(header, data)
    shape = header["shape"]
    checked_numel(shape, max_elements)  # before anything is sized from it
    assert isinstance(shape, list | tuple)
    values, indices, scales = _buffers(header, data)
    return Payload(
        encoding=str(header["encoding"]),
        dtype=str(header["dtype"]),
        shape=tuple(shape),
        count=_int(header["count"]),
        values=values,
        indices=indices,
        scales=scales,
        chunk=_int(header["chunk"]),
    )


def masked_payload_from_wire(
    header: Mapping[str, object],
    data: bytes | bytearray | memoryview,
    forward: Payload,
) -> Payload:
    """The payload a masked header and its data describe, at the entries `forward` (the
    payload of the value the masked one is the gradient of) kept; PayloadError names what
    is wrong."""
    _check_fields(header, data)
    values_fmt, _, index_fmt = str(header["encoding"]).partition("/")
    if index_fmt != MASKED:
        raise PayloadError(f"encoding {str(header['encoding'])!r:.60} is not masked")
    shape, count = header["shape"], _int(header["count"])
    # Compared before anything else is read: `forward` was checked, so a header that
    # matches it describes a tensor of a size already accepted.
    if (
        not isinstance(shape, list | tuple)
        or tuple(shape) != forward.shape
        or count != forward.count
    ):
        shown = list(shape) if isinstance(shape, list | tuple) else shape
        raise PayloadError(
            f"{show_int(count)} entries of {shown!s:.400}, its value kept {forward.count} "
            f"of {list(forward.shape)}"
        )
    if _int(header["indices_bytes"]) != 0:
        raise PayloadError(
            f"a masked payload leaves its positions out, the header declares "
            f"{show_int(_int(header['indices_bytes']))} index bytes"
        )
    values, _, scales = _buffers(header, data)
    return Payload(
        encoding=f"{values_fmt}/{forward.index_format}",
        dtype=str(header["dtype"]),
        shape=forward.shape,
        count=forward.count,
        values=values,
        indices=forward.indices,
        scales=scales,
        chunk=_int(header["chunk"]),
    )


def decode_wire(
    header: Mapping[str, object],
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """The tensor a header and its data describe, every part checked before use."""
    payload = payload_from_wire(header, data, max_elements=max_elements)
    return decode_payload(payload, max_elements=max_elements)


def _check_fields(header: Mapping[str, object], data: object) -> None:
    """Every header field present, known and of its type, and the version this one."""
    if not isinstance(header, Mapping):
        raise PayloadError(f"a payload header is a dict, not {type(header).__name__}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise PayloadError(f"payload data must be bytes, not {type(data).__name__}")
    for field in HEADER_FIELDS:
        if field not in header:
            raise PayloadError(f"payload header lacks field {field!r}")
    for field in header:
        if field not in HEADER_FIELDS:
            raise PayloadError(f"payload header has unknown field {str(field)!r:.40}")
    for field in ("version", "count", "chunk", *(f"{b}_bytes" for b in BUFFERS)):
        value = header[field]
        if not isinstance(value, int) or isinstance(value, bool):
            raise PayloadError(f"header field {field!r} must be an int, not {type(value).__name__}")
    for field in ("encoding", "dtype"):
        if not isinstance(header[field], str):
            raise PayloadError(
                f"header field {field!r} must be a string, not {type(header[field]).__name__}"
            )
    if header["version"] != WIRE_VERSION:
        raise PayloadError(
            f"payload wire version {show_int(_int(header['version']))} is not {WIRE_VERSION}"
        )


def _buffers(
    header: Mapping[str, object], data: bytes | bytearray | memoryview
) -> tuple[bytes, bytes, bytes]:
    """The data cut into values, indices and scales, after checking the lengths add up."""
    data = bytes(data)
    lengths = [_int(header[f"{b}_bytes"]) for b in BUFFERS]
    if any(n < 0 for n in lengths):
        shown = ", ".join(show_int(n) for n in lengths)
        raise PayloadError(f"header declares a negative buffer length: {shown}")
    if sum(lengths) != len(data):
        raise PayloadError(
            f"header declares {' + '.join(show_int(n) for n in lengths)} bytes "
            f"(values + indices + scales), the data holds {len(data)}"
        )
    values, indices = lengths[0], lengths[1]
    return data[:values], data[values : values + indices], data[values + indices :]


def _int(value: object) -> int:
    assert isinstance(value, int)  # checked by the caller; this tells the type checker
    return value
