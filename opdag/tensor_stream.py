"""Named values and tensors as a stream of bounded messages, and back.

A transfer is a header - the values' structure and every tensor's description - followed
by the tensors' raw bytes, concatenated in header order and cut into chunks of at most
`CHUNK_BYTES`. The receiver checks each description (dtype, shape, encoding, byte length)
before it reads a byte, refuses a stream that brings more or fewer bytes than declared,
and writes each chunk straight into the tensor it belongs to. Nothing is unpickled.

Used by the worker (stages, peer transfers, checkpoints) and the coordinator (stages it
sends, checkpoints it receives); it touches generated protobuf classes, as a codec may.
"""

from __future__ import annotations

import ctypes
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch

from opdag.errors import CodecError
from opdag.ir import DTYPES, dtype_name, dtype_of
from opdag.values import Value
from proto import tensor_pb2

# 1 MiB chunks stay well inside gRPC's message limit (set explicitly by the servers).
CHUNK_BYTES = 1 << 20
MAX_TENSORS = 1 << 16
MAX_DIMS = 16
MAX_DEPTH = 32


def header_of(name: str, t: torch.Tensor) -> tensor_pb2.TensorHeader:
    return tensor_pb2.TensorHeader(
        name=name,
        dtype=dtype_name(t.dtype),
        shape=tuple(t.shape),
        encoding="raw",
        nbytes=t.numel() * t.element_size(),
    )


def check_header(h: tensor_pb2.TensorHeader) -> tuple[torch.dtype, tuple[int, ...]]:
    """The dtype and shape a header declares, after checking it is self-consistent."""
    what = f"tensor {h.name!r}"
    if h.dtype not in DTYPES:
        raise CodecError(f"{what}: unknown dtype {h.dtype!r} (supported: {', '.join(DTYPES)})")
    if h.encoding != "raw":
        raise CodecError(f"{what}: unknown encoding {h.encoding!r} (expected 'raw')")
    if len(h.shape) > MAX_DIMS or any(d < 0 for d in h.shape):
        raise CodecError(f"{what}: invalid shape {list(h.shape)}")
    dtype = dtype_of(h.dtype)
    # A tensor with no elements may still name huge dimensions; torch refuses (RuntimeError)
    # any shape whose strides do not fit in int64.
    if math.prod(max(d, 1) for d in h.shape) * dtype.itemsize >= 1 << 63:
        raise CodecError(f"{what}: invalid shape {list(h.shape)} (too large)")
    expected = math.prod(h.shape) * dtype.itemsize
    if h.nbytes != expected:
        raise CodecError(
            f"{what}: {h.dtype}{list(h.shape)} is {expected} bytes, the header says {h.nbytes}"
        )
    return dtype, tuple(h.shape)


def iter_chunks(tensors: Sequence[torch.Tensor], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The raw bytes of `tensors`, concatenated in order, cut into chunks of `chunk_bytes`
    (the last one shorter); small tensors share a chunk."""
    pending: list[bytes] = []
    pending_size = 0
    for t in tensors:
        t = t.detach().cpu().contiguous()
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

    def __init__(self, headers: Sequence[tensor_pb2.TensorHeader], *, max_bytes: int) -> None:
        if len(headers) > MAX_TENSORS:
            raise CodecError(f"{len(headers)} tensors in one stream (at most {MAX_TENSORS})")
        self._names: list[str] = []
        self._targets: list[torch.Tensor] = []
        self._flat: list[torch.Tensor] = []
        total = 0
        for h in headers:
            dtype, shape = check_header(h)
            total += h.nbytes
            if total > max_bytes:
                raise CodecError(f"the stream declares over {max_bytes} bytes of tensors")
            self._names.append(h.name)
            self._targets.append(torch.empty(shape, dtype=dtype))
        for t in self._targets:
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
            raise CodecError(
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

    def finish(self) -> list[tuple[str, torch.Tensor]]:
        """The tensors, once every declared byte has arrived."""
        if self.received != self.total:
            raise CodecError(
                f"the stream ended after {self.received} of the {self.total} bytes declared"
            )
        return list(zip(self._names, self._targets, strict=True))


# -- values ----------------------------------------------------------------------------------


def encode_values(
    values: Mapping[str, Value],
) -> tuple[list[tensor_pb2.NamedValue], list[tuple[str, torch.Tensor]]]:
    """The wire structure of named values and the tensors it refers to, in order."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def encode(name: str, v: Value, out: tensor_pb2.WireValue, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CodecError(f"value {name!r} nests deeper than {MAX_DEPTH} levels")
        if isinstance(v, torch.Tensor):
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
            out.dtype = dtype_name(v)
        elif isinstance(v, torch.device):
            out.device = True
        elif isinstance(v, (tuple, list)):
            items = out.list_value if isinstance(v, list) else out.tuple_value
            items.SetInParent()
            for item in v:
                encode(name, item, items.items.add(), depth + 1)
        else:
            raise CodecError(f"value {name!r}: a {type(v).__name__} cannot cross between stages")

    named = []
    for name, value in values.items():
        nv = tensor_pb2.NamedValue(name=name)
        encode(name, value, nv.value, 0)
        named.append(nv)
    return named, tensors


def decode_values(
    named: Sequence[tensor_pb2.NamedValue],
    tensors: Sequence[torch.Tensor],
    *,
    device: torch.device,
) -> dict[str, Value]:
    """Named values from their wire structure and the stream's tensors (each used once)."""
    used: set[int] = set()

    def decode(name: str, pb: tensor_pb2.WireValue, depth: int) -> Value:
        if depth > MAX_DEPTH:
            raise CodecError(f"value {name!r} nests deeper than {MAX_DEPTH} levels")
        kind = pb.WhichOneof("kind")
        if kind == "tensor":
            if pb.tensor >= len(tensors) or pb.tensor in used:
                raise CodecError(
                    f"value {name!r} refers to tensor {pb.tensor}, which is "
                    f"{'used twice' if pb.tensor in used else 'not in the stream'}"
                )
            used.add(pb.tensor)
            return tensors[pb.tensor].to(device)
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
                return dtype_of(pb.dtype)
            except Exception as e:
                raise CodecError(f"value {name!r}: {e}") from None
        if kind == "device":
            return device
        if kind in ("tuple_value", "list_value"):
            items = [decode(name, item, depth + 1) for item in getattr(pb, kind).items]
            return items if kind == "list_value" else tuple(items)
        raise CodecError(f"value {name!r} is empty")

    out: dict[str, Value] = {}
    for nv in named:
        if nv.name in out:
            raise CodecError(f"value {nv.name!r} appears twice")
        out[nv.name] = decode(nv.name, nv.value, 0)
    if len(used) != len(tensors):
        raise CodecError(f"{len(tensors) - len(used)} tensors of the stream belong to no value")
    return out
