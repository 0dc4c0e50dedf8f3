"""The `.opdag` file format and checkpoint state blobs, over the graph serde.

File format: an 8-byte magic, a little-endian u32 format version, then records, each
`kind (1 byte) | length (u64) | payload | crc32 (u32)`: one graph record (`G`), one tensor
record (`T`) per parameter in the graph's order, and an end record (`E`, empty). A state
blob (a checkpoint part) has the same layout with its own magic and tensor records only.
Every record's checksum, length and content are checked before use; nothing is unpickled.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from opdag.errors import CodecError
from opdag.graph_serde import decode_graph, decode_tensor, encode_graph, encode_tensor
from opdag.ir import CapturedModel, Graph, dtype_name

MAGIC = b"\x89OPDAG\r\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sI")
_RECORD = struct.Struct("<cQ")
_CRC = struct.Struct("<I")
# A graph record above this is refused before it is read (a corrupt length field otherwise
# asks for terabytes). Tensors are bounded by the file itself.
MAX_GRAPH_BYTES = 256 << 20
MAX_TENSOR_BYTES = 1 << 40


# -- files -------------------------------------------------------------------------------


def _record(kind: bytes, payload: bytes) -> bytes:
    return _RECORD.pack(kind, len(payload)) + payload + _CRC.pack(zlib.crc32(payload))


def encode_model(model: CapturedModel) -> bytes:
    """The `.opdag` bytes of a captured model (deterministic: same model, same bytes)."""
    return b"".join(_iter_model_chunks(model))


def _iter_model_chunks(model: CapturedModel) -> Iterator[bytes]:
    graph = model.graph
    missing = [p.name for p in graph.params if p.name not in model.state]
    if missing:
        raise CodecError(f"tensors missing for parameters {missing[:5]}")
    yield _HEADER.pack(MAGIC, FORMAT_VERSION)
    yield _record(b"G", encode_graph(graph))
    for p in graph.params:
        yield _record(b"T", encode_tensor(p.name, model.state[p.name]))
    yield _record(b"E", b"")


def save(model: CapturedModel, path: str | Path) -> None:
    """Write a `.opdag` file atomically (a crash never leaves half a file under `path`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            for chunk in _iter_model_chunks(model):
                f.write(chunk)
        tmp.replace(path)
    except BaseException:
        # A model that cannot be encoded leaves nothing behind, not a stray partial file.
        tmp.unlink(missing_ok=True)
        raise


def decode_model(data: bytes) -> CapturedModel:
    import io

    return _read(io.BytesIO(data), len(data), "<bytes>")


def load(path: str | Path) -> CapturedModel:
    """Read and fully check a `.opdag` file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            return _read(f, size, str(path))
    except OSError as e:
        raise CodecError(f"cannot read {path}: {e.strerror}") from None


def _read(f: BinaryIO, size: int, where: str) -> CapturedModel:
    head = f.read(_HEADER.size)
    if head[:8] != MAGIC[: len(head[:8])]:
        raise CodecError(f"{where} is not an .opdag file (bad magic bytes)")
    if len(head) < _HEADER.size:
        raise CodecError(f"{where} is truncated: {size} bytes, inside the file header")
    _, version = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise CodecError(
            f"{where}: format version {version}; this Archipelago reads {FORMAT_VERSION}"
        )
    offset = _HEADER.size
    graph: Graph | None = None
    state: dict[str, torch.Tensor] = {}
    index = 0
    while True:
        rec = f.read(_RECORD.size)
        if len(rec) < _RECORD.size:
            raise CodecError(f"{where} is truncated: record {index} header ends at byte {size}")
        kind, length = _RECORD.unpack(rec)
        limit = MAX_GRAPH_BYTES if kind == b"G" else MAX_TENSOR_BYTES
        remaining = size - offset - _RECORD.size - _CRC.size
        if length > min(limit, max(remaining, 0)):
            raise CodecError(
                f"{where} is truncated or corrupt: record {index} claims {length} bytes, "
                f"{max(remaining, 0)} remain"
            )
        payload = f.read(length)
        crc = f.read(_CRC.size)
        if len(payload) < length or len(crc) < _CRC.size:
            raise CodecError(f"{where} is truncated inside record {index}")
        if _CRC.unpack(crc)[0] != zlib.crc32(payload):
            raise CodecError(f"{where} is corrupt: record {index} fails its checksum")
        offset += _RECORD.size + length + _CRC.size
        if kind == b"G":
            if graph is not None:
                raise CodecError(f"{where}: a second graph record (record {index})")
            graph = decode_graph(payload)
        elif kind == b"T":
            if graph is None:
                raise CodecError(f"{where}: tensor record {index} comes before the graph")
            name, t = decode_tensor(payload)
            if name in state:
                raise CodecError(f"{where}: tensor {name!r} appears twice")
            state[name] = t
        elif kind == b"E":
            break
        else:
            raise CodecError(f"{where}: unknown record kind {kind!r} at record {index}")
        index += 1
    if f.read(1):
        raise CodecError(f"{where}: unexpected bytes after the end record")
    if graph is None:
        raise CodecError(f"{where} has no graph")
    _check_state(graph, state, where)
    return CapturedModel(graph=graph, state=state)


def _check_state(graph: Graph, state: Mapping[str, torch.Tensor], where: str) -> None:
    specs = graph.param_specs
    extra = sorted(set(state) - set(specs))
    missing = sorted(set(specs) - set(state))
    if extra or missing:
        raise CodecError(f"{where}: tensors {extra[:5]} are not parameters; missing {missing[:5]}")
    for name, t in state.items():
        spec = specs[name]
        if tuple(t.shape) != spec.shape or dtype_name(t.dtype) != spec.dtype:
            raise CodecError(
                f"{where}: tensor {name!r} is {dtype_name(t.dtype)}{list(t.shape)}, the graph "
                f"declares {spec.dtype}{list(spec.shape)}"
            )


# -- training state (checkpoints) ------------------------------------------------------------

STATE_MAGIC = b"\x89OPSTA\r\n"


def encode_state(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Named tensors (a stage's parameters, buffers and optimizer state) as bytes: the same
    record layout as `.opdag` files, one checksummed tensor record each."""
    chunks = [_HEADER.pack(STATE_MAGIC, FORMAT_VERSION)]
    chunks += [_record(b"T", encode_tensor(name, t)) for name, t in tensors.items()]
    chunks.append(_record(b"E", b""))
    return b"".join(chunks)


def decode_state(data: bytes, where: str = "state") -> dict[str, torch.Tensor]:
    """Named tensors from `encode_state` bytes, every record checked."""
    import io

    f = io.BytesIO(data)
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:8] != STATE_MAGIC:
        raise CodecError(f"{where} is not training state (bad magic bytes)")
    if _HEADER.unpack(head)[1] != FORMAT_VERSION:
        raise CodecError(f"{where}: unsupported format version {_HEADER.unpack(head)[1]}")
    out: dict[str, torch.Tensor] = {}
    while True:
        rec = f.read(_RECORD.size)
        if len(rec) < _RECORD.size:
            raise CodecError(f"{where} is truncated after {len(out)} tensors")
        kind, length = _RECORD.unpack(rec)
        if length > len(data) - f.tell():
            raise CodecError(f"{where} is truncated or corrupt: a record claims {length} bytes")
        payload = f.read(length)
        crc = f.read(_CRC.size)
        if len(crc) < _CRC.size or _CRC.unpack(crc)[0] != zlib.crc32(payload):
            raise CodecError(f"{where} is corrupt: record {len(out)} fails its checksum")
        if kind == b"E":
            break
        if kind != b"T":
            raise CodecError(f"{where}: unknown record kind {kind!r}")
        name, t = decode_tensor(payload)
        if name in out:
            raise CodecError(f"{where}: tensor {name!r} appears twice")
        out[name] = t
    if f.read(1):
        raise CodecError(f"{where}: unexpected bytes after the end record")
    return out
