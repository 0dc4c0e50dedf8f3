"""Where the kept values of a sparse tensor sit: flat indices written as int32, as
LEB128-style varints of the gaps between sorted indices, or as a bitmap.

Indices are always sorted and distinct, so every format describes a set. The varint gap
is `index - previous - 1` (the first index counts from -1), which makes every decodable
stream strictly increasing by construction. All encoding and decoding is vectorised in
numpy: a handful of whole-array passes, never a Python loop per element.
"""

from __future__ import annotations

import math

import numpy as np

from compressors.errors import PayloadError

INDEX_FORMATS: tuple[str, ...] = ("dense", "int32", "varint", "bitmap")
SPARSE_INDEX_FORMATS: tuple[str, ...] = ("int32", "varint", "bitmap")

# A gap is below 2**31 (element counts are bounded by MAX_ELEMENTS), so 5 bytes of 7 bits.
VARINT_MAX_BYTES = 5
_VARINT_STEPS = np.array([1 << (7 * j) for j in range(1, VARINT_MAX_BYTES)], dtype=np.int64)


def index_length_range(fmt: str, count: int, numel: int) -> tuple[int, int]:
    """The (min, max) byte length of `count` indices into `numel` elements in format `fmt`."""
    if fmt == "dense":
        return 0, 0
    if fmt == "int32":
        return 4 * count, 4 * count
    if fmt == "bitmap":
        return -(-numel // 8), -(-numel // 8)
    if fmt == "varint":
        return count, VARINT_MAX_BYTES * count
    raise ValueError(f"indices: unknown format {fmt!r} (formats: {', '.join(INDEX_FORMATS)})")


def index_bytes(fmt: str, indices: np.ndarray, numel: int) -> int:
    """The exact byte length `encode_indices` would write for these sorted indices."""
    if fmt == "varint":
        return int(_varint_lengths(_gaps(indices)).sum())
    return index_length_range(fmt, indices.size, numel)[0]


def smallest_index_format(indices: np.ndarray, numel: int) -> str:
    """The sparse index format that writes these sorted indices in the fewest bytes."""
    sizes = {fmt: index_bytes(fmt, indices, numel) for fmt in SPARSE_INDEX_FORMATS}
    return min(SPARSE_INDEX_FORMATS, key=lambda fmt: sizes[fmt])


def expected_varint_bytes(count: int, numel: int) -> float:
    """Expected varint bytes for `count` indices spread uniformly over `numel` elements.

    With density d a gap is about geometric, P(gap >= m) = (1 - d)**m, and a value takes
    one byte plus one more for each power of 128 it reaches. Indices that cluster (as the
    largest activations often do) come out smaller, so this is the planner's upper guess.
    """
    if count <= 0 or numel <= 0:
        return 0.0
    miss = 1.0 - min(count / numel, 1.0)
    per_index = 1.0 + sum(miss ** float(step) for step in _VARINT_STEPS.tolist())
    return count * per_index


def estimated_index_bytes(fmt: str, count: int, numel: int) -> int:
    """Planning estimate of the index bytes for `count` of `numel` elements, indices unknown.

    `"auto"` gives the smallest format's estimate, which is what a sparsifier that picks
    its format per tensor will write.
    """
    if fmt == "auto":
        return min(estimated_index_bytes(f, count, numel) for f in SPARSE_INDEX_FORMATS)
    if fmt == "varint":
        return math.ceil(expected_varint_bytes(count, numel))
    return index_length_range(fmt, count, numel)[0]


def encode_indices(fmt: str, indices: np.ndarray, numel: int) -> bytes:
    """Write sorted, distinct int64 indices in `[0, numel)` in format `fmt`."""
    if indices.size and (indices[0] < 0 or indices[-1] >= numel):
        raise ValueError(f"indices must lie in [0, {numel})")
    if indices.size > 1 and not bool(np.all(indices[1:] > indices[:-1])):
        raise ValueError("indices must be sorted and distinct")
    if fmt == "int32":
        return indices.astype("<i4").tobytes()
    if fmt == "varint":
        return _encode_varints(_gaps(indices))
    if fmt == "bitmap":
        bits = np.zeros(numel, dtype=np.bool_)
        bits[indices] = True
        return np.packbits(bits, bitorder="little").tobytes()
    raise ValueError(f"indices: {fmt!r} is not a sparse index format")


def decode_indices(fmt: str, data: bytes, count: int, numel: int) -> np.ndarray:
    """Read and check `count` indices into `numel` elements; sorted int64, all in range.

    The byte length was checked against the header already; everything about the content
    is checked here, before any index is used.
    """
    if fmt == "int32":
        indices = np.frombuffer(data, dtype="<i4").astype(np.int64)
        _check_in_range(indices, numel)
        if indices.size > 1:
            bad = np.flatnonzero(indices[1:] <= indices[:-1])
            if bad.size:
                i = int(bad[0]) + 1
                raise PayloadError(
                    f"int32 indices are not strictly increasing: index {int(indices[i])} at "
                    f"position {i} follows {int(indices[i - 1])}"
                )
        return indices
    if fmt == "varint":
        gaps = _decode_varints(data, count)
        if gaps.size and int(gaps.max()) >= numel:
            # Checked before the running sum so a hostile gap cannot overflow int64.
            raise PayloadError(f"varint gap {int(gaps.max())} out of range for {numel} elements")
        indices = np.cumsum(gaps + 1) - 1
        _check_in_range(indices, numel)
        return indices
    if fmt == "bitmap":
        return _decode_bitmap(data, count, numel)
    raise PayloadError(f"indices: {fmt!r} is not a sparse index format")


def _check_in_range(indices: np.ndarray, numel: int) -> None:
    bad = np.flatnonzero((indices < 0) | (indices >= numel))
    if bad.size:
        raise PayloadError(
            f"index {int(indices[bad[0]])} out of range for {numel} elements "
            f"(position {int(bad[0])})"
        )


def _gaps(indices: np.ndarray) -> np.ndarray:
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    return gaps


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    # One byte, plus one for each power of 128 the value reaches.
    lengths = np.ones(values.size, dtype=np.int64)
    for step in _VARINT_STEPS:
        lengths += values >= step
    return lengths


def _encode_varints(values: np.ndarray) -> bytes:
    lengths = _varint_lengths(values)
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    # Pass j writes byte j of every value that has one: 7 bits, plus the continuation bit
    # for every byte but a value's last.
    for j in range(int(lengths.max()) if values.size else 0):
        has = np.flatnonzero(lengths > j)
        seven = (values[has] >> (7 * j)) & 0x7F
        more = (lengths[has] > j + 1).astype(np.int64) << 7
        out[starts[has] + j] = (seven | more).astype(np.uint8)
    return out.tobytes()


def _decode_varints(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)  # a value's last byte has no continuation bit
    if raw.size and (ends.size == 0 or ends[-1] != raw.size - 1):
        raise PayloadError("varint index stream ends in the middle of a value")
    if ends.size != count:
        raise PayloadError(f"varint index stream holds {ends.size} values, header says {count}")
    if count == 0:
        return np.empty(0, dtype=np.int64)
    starts = np.empty(count, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > VARINT_MAX_BYTES:
        raise PayloadError(
            f"varint index stream has a value of {int(lengths.max())} bytes "
            f"(at most {VARINT_MAX_BYTES})"
        )
    position = np.arange(raw.size, dtype=np.int64) - np.repeat(starts, lengths)
    parts = (raw & 0x7F).astype(np.int64) << (7 * position)
    return np.add.reduceat(parts, starts)


def _decode_bitmap(data: bytes, count: int, numel: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    spare = raw.size * 8 - numel
    if spare and int(raw[-1]) >> (8 - spare):
        raise PayloadError(f"bitmap sets bits past the tensor's {numel} elements")
    indices = np.flatnonzero(np.unpackbits(raw, count=numel, bitorder="little"))
    if indices.size != count:
        raise PayloadError(f"bitmap marks {indices.size} entries, header says {count}")
    return indices.astype(np.int64)
