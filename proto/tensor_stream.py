"""Named values and tensors as a stream of bounded messages, and back.

A transfer is a header - the values' structure and every tensor's description - followed
by the tensors' raw bytes, concatenated in header order and cut into chunks of at most
`CHUNK_BYTES`. The receiver checks each description (dtype, shape, encoding, byte length)
before it reads a byte, refuses a stream that brings more or fewer bytes than declared,
and writes each chunk straight into the tensor it belongs to. Nothing is unpickled.

Used by the worker (stages, peer transfers, checkpoints) and the coordinator (stages it
sends, checkpoints it receives). Part of the wire: it touches generated protobuf classes and
imports nothing of ours outside `proto`; every refusal is a `WireError`.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from proto import tensor_pb2
from proto.dtypes import DTYPE_NAMES, DTYPES
from proto.errors import WireError

# 1 MiB chunks stay well inside gRPC's message limit (set explicitly by the servers).
CHUNK_BYTES = 1 << 20
MAX_TENSORS = 1 << 16
MAX_DIMS = 16
MAX_DEPTH = 32


@dataclass(frozen=True)
class CompressedLayout:
    """How a compressed tensor's bytes are laid out: values, then indices, then scales.
    `codec` is "VALUES/INDICES" as the compressors write it ("mask" for INDICES when a
    gradient travels only at the entries its forward value kept)."""

    codec: str
    count: int
    chunk: int
    values_bytes: int
    indices_bytes: int
    scales_bytes: int


@dataclass(frozen=True, eq=False)
class EncodedTensor:
    """A tensor some codec outside this module turned into bytes (a compressed activation
    or gradient): the dense tensor's dtype and shape, the layout of the bytes, the bytes.
    It travels like a tensor; the receiver gets it back as such and decodes it itself."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    layout: CompressedLayout
    data: torch.Tensor  # uint8, one dimension

    @property
    def nbytes(self) -> int:
        return self.data.numel()


Wire = torch.Tensor | EncodedTensor
# What a named value may be: a tensor, a Python scalar, None, a dtype, a device, or a tuple or
# list of values. Kept open (Any) so callers pass their own values without casts.
Value = Any


def _dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a dtype the wire carries."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(
            f"dtype {dtype} is not supported (supported: {', '.join(DTYPES)})"
        ) from None


def _dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a stable dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(f"unknown dtype {name!r} (supported: {', '.join(DTYPES)})") from None


def header_of(name: str, t: Wire) -> tensor_pb2.TensorHeader:
    if isinstance(t, EncodedTensor):
        return tensor_pb2.TensorHeader(
            name=name,
            dtype=_dtype_name(t.dtype),
            shape=t.shape,
            encoding="compressed",
            nbytes=t.nbytes,
            compressed=tensor_pb2.CompressedLayout(
                codec=t.layout.codec,
                count=t.layout.count,
                chunk=t.layout.chunk,
                values_bytes=t.layout.values_bytes,
                indices_bytes=t.layout.indices_bytes,
                scales_bytes=t.layout.scales_bytes,
            ),
        )
    return tensor_pb2.TensorHeader(
        name=name,
        dtype=_dtype_name(t.dtype),
        shape=tuple(t.shape),
        encoding="raw",
        nbytes=t.numel() * t.element_size(),
    )


def check_header(
    h: tensor_pb2.TensorHeader, *, compressed: bool = False
) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape a header declares, after checking it is self-consistent;
    `compressed` also admits compressed tensors (whose layout the receiver checks in full
    when it decodes them; here only that its parts add up)."""
    what = f"tensor {h.name!r}"
    if h.dtype not in DTYPES:
        raise WireError(f"{what}: unknown dtype {h.dtype!r} (supported: {', '.join(DTYPES)})")
    if compressed and h.encoding == "compressed":
        if len(h.shape) > MAX_DIMS or any(d < 0 for d in h.shape):
            raise WireError(f"{what}: invalid shape {list(h.shape)}")
        if math.prod(max(d, 1) for d in h.shape) * _dtype_of(h.dtype).itemsize >= 1 << 63:
            raise WireError(f"{what}: invalid shape {list(h.shape)} (too large)")
        c = h.compressed
        parts = c.values_bytes + c.indices_bytes + c.scales_bytes
        if not h.HasField("compressed") or parts != h.nbytes:
            raise WireError(
                f"{what}: a compressed tensor's layout must account for its {h.nbytes} bytes "
                f"(values {c.values_bytes} + indices {c.indices_bytes} + scales "
                f"{c.scales_bytes})"
            )
        return _dtype_of(h.dtype), tuple(h.shape)
    if h.encoding != "raw":
        allowed = "'raw' or 'compressed'" if compressed else "'raw'"
        raise WireError(f"{what}: unknown encoding {h.encoding!r} (expected {allowed})")
    if len(h.shape) > MAX_DIMS or any(d < 0 for d in h.shape):
        raise WireError(f"{what}: invalid shape {list(h.shape)}")
    dtype = _dtype_of(h.dtype)
    # A tensor with no elements may still name huge dimensions; torch refuses (RuntimeError)
    # any shape whose strides do not fit in int64.
    if math.prod(max(d, 1) for d in h.shape) * dtype.itemsize >= 1 << 63:
        raise WireError(f"{what}: invalid shape {list(h.shape)} (too large)")
    expected = math.prod(h.shape) * dtype.itemsize
    if h.nbytes != expected:
        raise WireError(
            f"{what}: {h.dtype}{list(h.shape)} is {expected} bytes, the header says {h.nbytes}"
        )
    return dtype, tuple(h.shape)


def iter_chunks(tensors: Sequence[Wire], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The raw bytes of `tensors`, concatenated in order, cut into chunks of `chunk_bytes`
    (the last one shorter); small tensors share a chunk."""
    pending: list[bytes] = []
    pending_size = 0
    for item in tensors:
        t = (item.data if isinstance(item, EncodedTensor) else item).detach().cpu().contiguous()
        size = t.numel() * t.element_size()
        address = t.data_ptr()
        offset = 0
        while offset < size:
            take = min(size - offset, chunk_bytes - pending_size)
            pending.append(ctypes.string_at(address + offset, take))
            pending_size += take
            offset += take
            if pending_size == chunk_bytes:
                yield b"".join(pending)
                pending, pending_size = [], 0
    if pending_size:
        yield b"".join(pending)


class TensorAssembler:
    """Rebuilds the tensors of a stream from their headers and the chunks that follow."""

    def __init__(
        self,
        headers: Sequence[tensor_pb2.TensorHeader],
        *,
        max_bytes: int,
        compressed: bool = False,
    ) -> None:
        """`compressed`: the stream may hold compressed tensors (peer transfers only);
        `finish` returns them as `EncodedTensor`s for the caller to decode."""
        if len(headers) > MAX_TENSORS:
            raise WireError(f"{len(headers)} tensors in one stream (at most {MAX_TENSORS})")
        self._names: list[str] = []
        self._targets: list[Wire] = []
        self._flat: list[torch.Tensor] = []
        total = 0
        for h in headers:
            dtype, shape = check_header(h, compressed=compressed)
            total += h.nbytes
            if total > max_bytes:
                raise WireError(f"the stream declares over {max_bytes} bytes of tensors")
            self._names.append(h.name)
            if h.encoding == "compressed":
                data = torch.empty(h.nbytes, dtype=torch.uint8)
                c = h.compressed
                layout = CompressedLayout(
                    codec=c.codec,
                    count=c.count,
                    chunk=c.chunk,
                    values_bytes=c.values_bytes,
                    indices_bytes=c.indices_bytes,
                    scales_bytes=c.scales_bytes,
                )
                self._targets.append(EncodedTensor(dtype, shape, layout, data))
                self._flat.append(data)
                continue
            t = torch.empty(shape, dtype=dtype)
            self._targets.append(t)
            self._flat.append(
                t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
            )
        self.total = total
        self.received = 0
        self._index = 0
        self._offset = 0

    def feed(self, chunk: bytes) -> None:
        """Copy one chunk into the tensors it covers."""
        if self.received + len(chunk) > self.total:
            raise WireError(
                f"the stream brings more than the {self.total} bytes its headers declare"
            )
        if not chunk:
            return
        with warnings.catch_warnings():
            # The chunk is only read; torch warns because `bytes` is immutable.
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(chunk, dtype=torch.uint8)
        pos = 0
        while pos < len(chunk):
            while self._offset == self._flat[self._index].numel():
                self._index += 1
                self._offset = 0
            dst = self._flat[self._index]
            take = min(len(chunk) - pos, dst.numel() - self._offset)
            dst[self._offset : self._offset + take].copy_(src[pos : pos + take])
            self._offset += take
            pos += take
        self.received += len(chunk)

    def finish_wire(self) -> list[tuple[str, Wire]]:
        """The tensors (compressed ones as `EncodedTensor`s), once every declared byte has
        arrived."""
        if self.received != self.total:
            raise WireError(
                f"the stream ended after {self.received} of the {self.total} bytes declared"
            )
        return list(zip(self._names, self._targets, strict=True))

    def finish(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors of a stream without compressed ones, once every byte has arrived."""
        out = []
        for name, t in self.finish_wire():
            if isinstance(t, EncodedTensor):
                raise WireError(f"tensor {name!r}: a compressed tensor cannot be read here")
            out.append((name, t))
        return out


# -- values ----------------------------------------------------------------------------------


def encode_values(
    values: Mapping[str, Value | EncodedTensor],
) -> tuple[list[tensor_pb2.NamedValue], list[tuple[str, Wire]]]:
    """The wire structure of named values and the tensors it refers to, in order."""
    tensors: list[tuple[str, Wire]] = []

    def encode(name: str, v: Value | EncodedTensor, out: tensor_pb2.WireValue, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise WireError(f"value {name!r} nests deeper than {MAX_DEPTH} levels")
        if isinstance(v, torch.Tensor | EncodedTensor):
            out.tensor = len(tensors)
            tensors.append((f"{name}.{len(tensors)}", v))
        elif isinstance(v, bool):
            out.bool_value = v
        elif isinstance(v, int):
            out.int_value = v
        elif isinstance(v, float):
            out.float_value = v
        elif v is None:
            out.none = True
        elif isinstance(v, torch.dtype):
            out.dtype = _dtype_name(v)
        elif isinstance(v, torch.device):
            out.device = True
        elif isinstance(v, (tuple, list)):
            items = out.list_value if isinstance(v, list) else out.tuple_value
            items.SetInParent()
            for item in v:
                encode(name, item, items.items.add(), depth + 1)
        else:
            raise WireError(f"value {name!r}: a {type(v).__name__} cannot cross between stages")

    named = []
    for name, value in values.items():
        nv = tensor_pb2.NamedValue(name=name)
        encode(name, value, nv.value, 0)
        named.append(nv)
    return named, tensors


def decode_values(
    named: Sequence[tensor_pb2.NamedValue],
    tensors: Sequence[Wire],
    *,
    device: torch.device,
) -> dict[str, Value]:
    """Named values from their wire structure and the stream's tensors (each used once);
    an `EncodedTensor` is left in place for the caller to decode."""
    used: set[int] = set()

    def decode(name: str, pb: tensor_pb2.WireValue, depth: int) -> Value:
        if depth > MAX_DEPTH:
            raise WireError(f"value {name!r} nests deeper than {MAX_DEPTH} levels")
        kind = pb.WhichOneof("kind")
        if kind == "tensor":
            if pb.tensor >= len(tensors) or pb.tensor in used:
                raise WireError(
                    f"value {name!r} refers to tensor {pb.tensor}, which is "
                    f"{'used twice' if pb.tensor in used else 'not in the stream'}"
                )
            used.add(pb.tensor)
            t = tensors[pb.tensor]
            return t if isinstance(t, EncodedTensor) else t.to(device)
        if kind == "int_value":
            return int(pb.int_value)
        if kind == "float_value":
            return float(pb.float_value)
        if kind == "bool_value":
            return bool(pb.bool_value)
        if kind == "none":
            return None
        if kind == "dtype":
            try:
                return _dtype_of(pb.dtype)
            except WireError as e:
                raise WireError(f"value {name!r}: {e}") from None
        if kind == "device":
            return device
        if kind in ("tuple_value", "list_value"):
            items = [decode(name, item, depth + 1) for item in getattr(pb, kind).items]
            return items if kind == "list_value" else tuple(items)
        raise WireError(f"value {name!r} is empty")

    out: dict[str, Value] = {}
    for nv in named:
        if nv.name in out:
            raise WireError(f"value {nv.name!r} appears twice")
        out[nv.name] = decode(nv.name, nv.value, 0)
    if len(used) != len(tensors):
        raise WireError(f"{len(tensors) - len(used)} tensors of the stream belong to no value")
    return out
