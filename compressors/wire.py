"""A payload on the wire: a flat header of plain ints and strings, and one byte string.

The header names every field of the payload and the length of each buffer; the data is
the buffers back to back (values, indices, scales). Nothing is pickled. Reading checks
the header's types and lengths before slicing anything, and the payload checks every
field against the others, so hostile input is refused with `PayloadError` before any
allocation sized from it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from compressors.encoding import DEFAULT_MAX_ELEMENTS, decode_payload
from compressors.errors import PayloadError
from compressors.payload import Payload, checked_numel, show_int

WIRE_VERSION = 1
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

Header = dict[str, str | int | list[int]]


def payload_to_wire(payload: Payload) -> tuple[Header, bytes]:
    """The header and data bytes of a payload."""
    header: Header = {
        "version": WIRE_VERSION,
        "encoding": payload.encoding,
        "dtype": payload.dtype,
        "shape": list(payload.shape),
        "count": payload.count,
        "chunk": payload.chunk,
    }
    for name in BUFFERS:
        header[f"{name}_bytes"] = len(getattr(payload, name))
    return header, payload.values + payload.indices + payload.scales


def payload_from_wire(
    header: Mapping[str, object],
    data: bytes | bytearray | memoryview,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Payload:
    """The payload a header and its data describe; PayloadError names what is wrong."""
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
    shape = header["shape"]
    checked_numel(shape, max_elements)  # before anything is sized from it
    assert isinstance(shape, list | tuple)

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
    buffers = []
    start = 0
    for n in lengths:
        buffers.append(data[start : start + n])
        start += n
    return Payload(
        encoding=str(header["encoding"]),
        dtype=str(header["dtype"]),
        shape=tuple(shape),
        count=_int(header["count"]),
        values=buffers[0],
        indices=buffers[1],
        scales=buffers[2],
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


def _int(value: object) -> int:
    assert isinstance(value, int)  # checked by the caller; this tells the type checker
    return value
