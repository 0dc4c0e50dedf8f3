"""A stored dataset's manifest: what its content-addressed chunks hold, in one record.

A dataset is stored as one byte stream cut into chunks of `CHUNK_BYTES` (the last may be
shorter), each named by its SHA-256. The stream is the dataset's arrays one after another,
each little-endian, C order: a token dataset has one array, `tokens` (1-D), and names the
two inputs its windows feed (`fields`: the window and the window shifted by one); an array
dataset has named arrays of equal rows (`images`, `labels`, ...), each an input of the model.
The last `val_rows` rows (tokens, for a token dataset) are held out for validation.

The manifest travels and is stored as canonical JSON (sorted keys, no spaces); its SHA-256
is the dataset's id, so a job that names a dataset is pinned to its exact content.
`Manifest.from_json` checks every field of a manifest that came over the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from opdag.data import DataError

CHUNK_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
VERSION = 1
KINDS = ("tokens", "arrays")
FORMATS = ("text", "jsonl", "npy", "bin", "npz")
# Stored element types, with their sizes; little-endian throughout.
DTYPES: dict[str, int] = {
    "uint8": 1,
    "int8": 1,
    "uint16": 2,
    "int16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
}
TOKEN_DTYPES = ("uint8", "uint16", "int32")
MAX_ARRAYS = 16
MAX_DIMS = 8
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA_PATTERN = re.compile(r"[0-9a-f]{64}")
_FIELD_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def check_dataset_name(name: object) -> str:
    """A dataset name: 1 to 100 letters, digits, '.', '_' or '-', starting with one of the
    first two (it never reads as a flag or a path)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise DataError(
            f"dataset name {name!r} must be 1 to 100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ArrayInfo:
    """One array of the stream: its name, element type, shape (rows first) and where its
    bytes start in the stream."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    # Integer arrays: their smallest and largest value (checked against the model: token
    # ids below its vocab, labels below its classes; and on every batch read). 0 for floats.
    low: int = 0
    high: int = 0

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.itemsize

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


@dataclass(frozen=True)
class Manifest:
    """What a stored dataset is (see the module's docstring)."""

    name: str
    kind: str
    format: str
    arrays: tuple[ArrayInfo, ...]
    chunks: tuple[tuple[str, int], ...]  # (sha256, bytes) in stream order
    val_rows: int
    vocab: int = 0  # tokens: every id is below it
    fields: tuple[str, ...] = ()  # tokens: the names of the window and its shift

    def __post_init__(self) -> None:
        _check_manifest(self)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.chunks)

    @property
    def rows(self) -> int:
        return self.arrays[0].rows

    @property
    def train_rows(self) -> int:
        return self.rows - self.val_rows

    @property
    def input_names(self) -> tuple[str, ...]:
        """The names of the inputs a batch of this dataset holds."""
        return self.fields if self.kind == "tokens" else tuple(a.name for a in self.arrays)

    def array(self, name: str) -> ArrayInfo:
        for a in self.arrays:
            if a.name == name:
                return a
        raise DataError(f"dataset {self.name!r} has no array {name!r}")

    def to_plain(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "name": self.name,
            "kind": self.kind,
            "format": self.format,
            "arrays": [
                {
                    "name": a.name,
                    "dtype": a.dtype,
                    "shape": list(a.shape),
                    "offset": a.offset,
                    "low": a.low,
                    "high": a.high,
                }
                for a in self.arrays
            ],
            "chunks": [[sha, size] for sha, size in self.chunks],
            "val_rows": self.val_rows,
            "vocab": self.vocab,
            "fields": list(self.fields),
        }

    def to_json(self) -> bytes:
        """The canonical encoding (its SHA-256 is the dataset's id)."""
        return json.dumps(self.to_plain(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def sha256(self) -> str:
        return sha256_hex(self.to_json())

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """A manifest from its JSON, every field checked; DataError names what is wrong."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise DataError(f"dataset manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            plain = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"dataset manifest is not JSON: {e}") from None
        return cls.from_plain(plain)

    @classmethod
    def from_plain(cls, plain: object) -> Manifest:
        keys = {"version", "name", "kind", "format", "arrays", "chunks", "val_rows"}
        keys |= {"vocab", "fields"}
        if not isinstance(plain, dict) or set(plain) != keys:
            raise DataError(f"dataset manifest must be a mapping of exactly {sorted(keys)}")
        if plain["version"] != VERSION:
            raise DataError(f"dataset manifest version {plain['version']!r} is not {VERSION}")
        arrays, chunks = plain["arrays"], plain["chunks"]
        if not isinstance(arrays, list) or not isinstance(chunks, list):
            raise DataError("dataset manifest: arrays and chunks must be lists")
        fields = plain["fields"]
        if not isinstance(fields, list):
            raise DataError("dataset manifest: fields must be a list")
        return cls(
            name=plain["name"],
            kind=plain["kind"],
            format=plain["format"],
            arrays=tuple(_array_from_plain(a) for a in arrays),
            chunks=tuple(_chunk_from_plain(c) for c in chunks),
            val_rows=plain["val_rows"],
            vocab=plain["vocab"],
            fields=tuple(fields),
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _array_from_plain(a: object) -> ArrayInfo:
    keys = {"name", "dtype", "shape", "offset", "low", "high"}
    if not isinstance(a, dict) or set(a) != keys:
        raise DataError(f"dataset manifest: each array needs exactly {sorted(keys)}")
    shape = a["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise DataError(f"dataset manifest: array shape {shape!r} must be a list of ints")
    return ArrayInfo(
        name=a["name"],
        dtype=a["dtype"],
        shape=tuple(shape),
        offset=a["offset"],
        low=a["low"],
        high=a["high"],
    )


def _chunk_from_plain(c: object) -> tuple[str, int]:
    if not isinstance(c, list) or len(c) != 2:
        raise DataError(f"dataset manifest: chunk {c!r} must be [sha256, bytes]")
    return (c[0], c[1])


def _check_manifest(m: Manifest) -> None:
    check_dataset_name(m.name)
    # Types first: a manifest from the network may hold anything JSON can.
    for what, value in (("kind", m.kind), ("format", m.format)):
        if not isinstance(value, str):
            raise DataError(f"dataset {what} {value!r} is not a string")
    if m.kind not in KINDS:
        raise DataError(f"dataset kind {m.kind!r} is not one of {', '.join(KINDS)}")
    if m.format not in FORMATS:
        raise DataError(f"dataset format {m.format!r} is not one of {', '.join(FORMATS)}")
    if not m.chunks:
        raise DataError("dataset manifest names no chunks")
    for i, (sha, size) in enumerate(m.chunks):
        if not isinstance(sha, str) or not _SHA_PATTERN.fullmatch(sha):
            raise DataError(f"dataset chunk {i}: {sha!r} is not a SHA-256 in hex")
        last = i == len(m.chunks) - 1
        if not _is_int(size) or not (0 < size <= CHUNK_BYTES) or (not last and size != CHUNK_BYTES):
            raise DataError(
                f"dataset chunk {i}: size {size!r} does not fit {CHUNK_BYTES}-byte chunks"
            )
    if not 1 <= len(m.arrays) <= MAX_ARRAYS:
        raise DataError(f"a dataset holds 1 to {MAX_ARRAYS} arrays, not {len(m.arrays)}")
    offset = 0
    for a in m.arrays:
        if not isinstance(a.name, str) or not _FIELD_PATTERN.fullmatch(a.name):
            raise DataError(f"dataset array name {a.name!r} is not an identifier")
        if not isinstance(a.dtype, str) or a.dtype not in DTYPES:
            raise DataError(f"dataset array {a.name!r}: dtype {a.dtype!r} is not stored")
        if not 1 <= len(a.shape) <= MAX_DIMS or any(not _is_int(d) or d < 1 for d in a.shape):
            raise DataError(f"dataset array {a.name!r}: shape {a.shape!r} must be positive ints")
        if not (_is_int(a.low) and _is_int(a.high) and a.low <= a.high):
            raise DataError(f"dataset array {a.name!r}: bounds {a.low!r}..{a.high!r} are not ints")
        if a.dtype.startswith("float") and (a.low, a.high) != (0, 0):
            raise DataError(f"dataset array {a.name!r} holds floats: it has no bounds")
        if a.offset != offset:
            raise DataError(f"dataset array {a.name!r} starts at {a.offset!r}, not at {offset}")
        offset += a.nbytes
    if offset != m.total_bytes:
        raise DataError(f"dataset arrays take {offset} bytes but its chunks hold {m.total_bytes}")
    if len({a.name for a in m.arrays}) != len(m.arrays):
        raise DataError("dataset array names repeat")
    if len({a.rows for a in m.arrays}) != 1:
        raise DataError("dataset arrays disagree on their rows")
    if not _is_int(m.val_rows) or not 1 <= m.val_rows < m.rows:
        raise DataError(f"dataset held-out rows {m.val_rows!r} must be in [1, {m.rows - 1}]")
    _check_kind(m)


def _check_kind(m: Manifest) -> None:
    if m.kind == "arrays":
        if m.vocab != 0 or m.fields:
            raise DataError("an array dataset has no vocab and no fields")
        return
    (tokens,) = m.arrays if len(m.arrays) == 1 else (None,)
    if tokens is None or tokens.name != "tokens" or len(tokens.shape) != 1:
        raise DataError("a token dataset holds one 1-D array named 'tokens'")
    if tokens.dtype not in TOKEN_DTYPES:
        raise DataError(f"token dtype {tokens.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
    if not _is_int(m.vocab) or not 1 <= m.vocab <= 2**31 - 1:
        raise DataError(f"token dataset vocab {m.vocab!r} must be in [1, 2**31 - 1]")
    if tokens.low < 0 or tokens.high >= m.vocab:
        raise DataError(f"token ids {tokens.low}..{tokens.high} do not fit the vocab {m.vocab}")
    for f in m.fields:
        if not isinstance(f, str) or not _FIELD_PATTERN.fullmatch(f):
            raise DataError(f"dataset field name {f!r} is not an identifier")
    if len(m.fields) != 2 or len(set(m.fields)) != 2:
        raise DataError(f"a token dataset names two distinct fields, not {list(m.fields)!r}")


def chunk_stream(stream: bytes | memoryview) -> list[tuple[str, int]]:
    """The (sha256, size) of each chunk of `stream`."""
    view = memoryview(stream)
    return [
        (sha256_hex(view[i : i + CHUNK_BYTES]), len(view[i : i + CHUNK_BYTES]))
        for i in range(0, len(view), CHUNK_BYTES)
    ]


def verified_chunk(manifest: Manifest, index: int, data: bytes | None) -> bytes:
    """`data` if it is chunk `index` of `manifest` by its SHA-256; DataError naming the
    chunk otherwise."""
    sha, size = manifest.chunks[index]
    if data is None:
        raise DataError(f"dataset {manifest.name!r}: chunk {index} ({sha[:12]}) is missing")
    actual = sha256_hex(data)
    if actual != sha or len(data) != size:
        raise DataError(
            f"dataset {manifest.name!r}: chunk {index} ({sha[:12]}) refused: its bytes hash "
            f"to {actual[:12]}"
        )
    return data
