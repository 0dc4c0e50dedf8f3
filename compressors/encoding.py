"""Turning tensors into payloads and payloads back into tensors.

`encode_dense` and `encode_sparse` are the two ways in; `decode_payload` is the one way
out, whatever compressor made the payload, and it checks everything before it allocates
or indexes anything.
"""

from __future__ import annotations

import numpy as np
import torch

from compressors.dtypes import DTYPES, FLOATING, dtype_name
from compressors.errors import PayloadError
from compressors.index_coding import (
    decode_indices,
    encode_indices,
    estimated_index_bytes,
    smallest_index_format,
)
from compressors.payload import (
    MAX_ELEMENTS,
    Payload,
    check_payload,
    encoding_name,
)
from compressors.value_coding import (
    SCALE_ITEMSIZE,
    decode_values,
    encode_values,
    scale_count,
    value_itemsize,
)

# What a receiver allocates at most for one tensor unless it says otherwise: 2**28
# elements (1 GiB of fp32). A sparse payload of a few bytes can declare any shape, so
# the bound has to hold before the dense output is allocated.
DEFAULT_MAX_ELEMENTS = 1 << 28


def flat_cpu(x: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat, contiguous CPU tensor, detached from autograd."""
    return x.detach().to("cpu").reshape(-1).contiguous()


def encode_dense(x: torch.Tensor, values: str = "raw", chunk: int | None = None) -> Payload:
    """Every element of `x`, its values in format `values` (`chunk`: int8 values per scale)."""
    dtype = dtype_name(x.dtype)
    if values != "raw" and dtype not in FLOATING:
        raise ValueError(f"values: {values} needs a floating-point tensor, not {dtype}")
    flat = flat_cpu(x)
    data, scales, chunk_used = encode_values(flat, values, chunk)
    return Payload(
        encoding=encoding_name(values, "dense"),
        dtype=dtype,
        shape=tuple(x.shape),
        count=flat.numel(),
        values=data,
        scales=scales,
        chunk=chunk_used,
    )


def encode_sparse(
    x: torch.Tensor,
    indices: np.ndarray,
    values: str = "raw",
    index_format: str = "auto",
    chunk: int | None = None,
) -> Payload:
    """The entries of `x` at sorted, distinct flat `indices`; the rest decode as zeros.

    `index_format` "auto" writes the indices in whichever format is smallest for them.
    """
    dtype = dtype_name(x.dtype)
    if dtype not in FLOATING:
        raise ValueError(f"a sparse payload needs a floating-point tensor, not {dtype}")
    flat = flat_cpu(x)
    numel = flat.numel()
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    fmt = smallest_index_format(indices, numel) if index_format == "auto" else index_format
    index_data = encode_indices(fmt, indices, numel)
    kept = flat[torch.from_numpy(indices)]
    data, scales, chunk_used = encode_values(kept, values, chunk)
    return Payload(
        encoding=encoding_name(values, fmt),
        dtype=dtype,
        shape=tuple(x.shape),
        count=int(indices.size),
        values=data,
        indices=index_data,
        scales=scales,
        chunk=chunk_used,
    )


def decode_payload(payload: Payload, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """The tensor a payload describes (zeros where a sparse payload kept nothing).

    Refuses, with PayloadError, a payload over `max_elements` elements or one whose index
    content is wrong (out of range, unordered, more or fewer than its count).
    """
    check_payload(payload, max_elements)
    kept = decode_values(
        payload.value_format,
        payload.dtype,
        payload.count,
        payload.values,
        payload.scales,
        payload.chunk,
    )
    if not payload.is_sparse:
        return kept.reshape(payload.shape)
    indices = _indices(payload)
    out = torch.zeros(payload.numel, dtype=DTYPES[payload.dtype])
    out[torch.from_numpy(indices)] = kept
    return out.reshape(payload.shape)


def kept_indices(
    payload: Payload, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> torch.Tensor | None:
    """The sorted flat int64 indices a sparse payload kept; None for a dense payload."""
    check_payload(payload, max_elements)
    if not payload.is_sparse:
        return None
    return torch.from_numpy(_indices(payload))


def _indices(payload: Payload) -> np.ndarray:
    indices = decode_indices(payload.index_format, payload.indices, payload.count, payload.numel)
    if indices.size != payload.count:  # the formats check this; a decoder never trusts it
        raise PayloadError(f"decoded {indices.size} indices, header says {payload.count}")
    return indices


def sparse_wire_bytes(
    count: int,
    numel: int,
    *,
    dtype: str = "float32",
    values: str = "raw",
    indices: str = "auto",
    chunk: int | None = None,
) -> int:
    """Planning estimate of a sparse payload's bytes: `count` kept of `numel` elements.

    Values and scales are exact; index bytes are exact for int32 and bitmap and the
    uniform-spread expectation for varint (see `expected_varint_bytes`).
    """
    if not 0 <= count <= numel <= MAX_ELEMENTS:
        raise ValueError(
            f"count {count} and numel {numel} must satisfy 0 <= count <= numel <= {MAX_ELEMENTS}"
        )
    chunk = max(count, 1) if chunk is None else chunk
    value_bytes = count * value_itemsize(values, dtype)
    scale_bytes = scale_count(values, count, chunk) * SCALE_ITEMSIZE
    return value_bytes + scale_bytes + estimated_index_bytes(indices, count, numel)


def dense_wire_bytes(
    numel: int, *, dtype: str = "float32", values: str = "raw", chunk: int | None = None
) -> int:
    """Bytes of a dense payload of `numel` elements in value format `values`."""
    chunk = max(numel, 1) if chunk is None else chunk
    return (
        numel * value_itemsize(values, dtype) + scale_count(values, numel, chunk) * SCALE_ITEMSIZE
    )
