"""Header-then-chunks request streams, written and read the one way both services do.

A stream that brings tensors (a stage, a peer transfer, a checkpoint) is a `oneof part`
message: first the header, then only `chunk`s carrying the tensors' bytes. `stream_parts`
writes one; `open_stream` takes the header off one, and the `IncomingTensors` it returns
reads the rest into a `TensorAssembler` once the receiver knows how many bytes it will
accept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import torch

from proto.errors import StreamError
from proto.tensor_stream import TensorAssembler, Value, Wire, decode_values, iter_chunks

Part = TypeVar("Part")


async def stream_parts(
    part: Callable[..., Part], header_field: str, header: Any, tensors: Sequence[Wire]
) -> AsyncIterator[Part]:
    """The messages of a stream: `part(header_field=header)`, then the tensors' bytes as
    `part(chunk=...)`s in order."""
    yield part(**{header_field: header})
    for chunk in iter_chunks(tensors):
        yield part(chunk=chunk)


class IncomingTensors:
    """The tensors a stream's header announces, still on the wire: the header's
    descriptions of them, and the rest of the stream, which must be their chunks."""

    def __init__(self, header: Any, parts: AsyncIterator[Any]) -> None:
        """`header`: the stream's header message (with `tensors`, and `values` when the
        stream carries named values); `parts`: the messages after it."""
        self._header = header
        self._parts = parts

    async def _assemble(self, *, max_bytes: int, compressed: bool) -> TensorAssembler:
        # The headers are checked (and `max_bytes` applied) before a byte is read.
        assembler = TensorAssembler(
            self._header.tensors, max_bytes=max_bytes, compressed=compressed
        )
        async for part in self._parts:
            if part.WhichOneof("part") != "chunk":
                raise StreamError("only chunks may follow the header")
            assembler.feed(part.chunk)
        return assembler

    async def read(self, *, max_bytes: int) -> list[tuple[str, torch.Tensor]]:
        """The named tensors, once every declared byte has arrived (compressed ones are
        refused); WireError if they are not what the header said or exceed `max_bytes`."""
        return (await self._assemble(max_bytes=max_bytes, compressed=False)).finish()

    async def read_values(self, *, max_bytes: int, device: torch.device) -> dict[str, Value]:
        """The header's named values with their tensors; a compressed tensor is left in
        place as an `EncodedTensor` for the receiver to decode."""
        assembler = await self._assemble(max_bytes=max_bytes, compressed=True)
        tensors: list[Wire] = [t for _, t in assembler.finish_wire()]
        return decode_values(self._header.values, tensors, device=device)


async def open_stream(parts: AsyncIterator[Any], header: str) -> tuple[Any, IncomingTensors]:
    """The header message of a stream whose first part must be `header`, and the tensors
    that follow it; StreamError for an empty stream or one that starts otherwise."""
    try:
        first = await anext(parts)
    except StopAsyncIteration:
        raise StreamError("empty stream") from None
    if first.WhichOneof("part") != header:
        raise StreamError(f"the stream must start with its {header}")
    message = getattr(first, header)
    return message, IncomingTensors(message, parts)
