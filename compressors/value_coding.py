"""How the kept values of a tensor become bytes: as they are, as fp32 or fp16, or as int8
with one fp32 scale per chunk of values.

Every function here works on a flat, contiguous CPU tensor of values; where those values
sit in the tensor is `index_coding`'s business. Bytes are the host's order (little-endian
on every machine we run on).
"""

from __future__ import annotations

import numpy as np
import torch

from compressors.dtypes import DTYPES, itemsize
from compressors.errors import PayloadError

VALUE_FORMATS: tuple[str, ...] = ("raw", "fp32", "fp16", "int8")
LOSSY_FORMATS: frozenset[str] = frozenset({"fp32", "fp16", "int8"})

# fp16 overflows to inf past this; values beyond it are clamped (saturated) instead, so a
# large activation arrives as the largest finite half rather than as an infinity.
FP16_MAX = 65504.0
INT8_LEVELS = 127
DEFAULT_INT8_CHUNK = 2048
SCALE_ITEMSIZE = 4  # one float32 per chunk

_FORMAT_ITEMSIZE = {"fp32": 4, "fp16": 2, "int8": 1}


def value_itemsize(fmt: str, dtype: str) -> int:
    """Bytes each kept value takes in format `fmt` for a tensor of `dtype` (scales aside)."""
    return itemsize(dtype) if fmt == "raw" else _FORMAT_ITEMSIZE[fmt]


def scale_count(fmt: str, count: int, chunk: int) -> int:
    """How many int8 scales `count` values in chunks of `chunk` need (0 for other formats)."""
    if fmt != "int8":
        return 0
    return -(-count // chunk)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements, in order."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_tensor(buf: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A fresh, writable 1-D tensor of `count` elements read from `buf`.

    The caller has checked that `buf` holds exactly `count` elements. Copying into a new
    tensor (rather than viewing the immutable bytes) is what the decoder needs anyway: the
    result is handed to code that may write to it.
    """
    out = torch.empty(count, dtype=dtype)
    if count:
        out.view(torch.uint8).numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out


def encode_values(values: torch.Tensor, fmt: str, chunk: int | None) -> tuple[bytes, bytes, int]:
    """Encode a flat tensor of values; returns (value bytes, scale bytes, chunk).

    `chunk` matters only for int8: elements per scale, or None for one scale over all
    values. The returned chunk is 0 for the other formats.
    """
    if fmt == "raw":
        return tensor_bytes(values), b"", 0
    if fmt == "fp32":
        return tensor_bytes(values.to(torch.float32)), b"", 0
    if fmt == "fp16":
        return tensor_bytes(values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)), b"", 0
    if fmt == "int8":
        count = values.numel()
        chunk = max(count, 1) if chunk is None else chunk
        q, scales = _quantize_int8(values.to(torch.float32), chunk)
        return tensor_bytes(q), tensor_bytes(scales), chunk
    raise ValueError(f"values: unknown format {fmt!r} (formats: {', '.join(VALUE_FORMATS)})")


def decode_values(
    fmt: str, dtype: str, count: int, values: bytes, scales: bytes, chunk: int
) -> torch.Tensor:
    """The flat tensor of `count` values of `dtype` that `encode_values` wrote.

    Buffer lengths were checked against the header when the payload was built; what is
    checked here is content only a decoder sees (bool bytes other than 0 and 1).
    """
    target = DTYPES[dtype]
    if fmt == "raw":
        out = bytes_tensor(values, target, count)
        if target == torch.bool and count and int(np.frombuffer(values, np.uint8).max()) > 1:
            raise PayloadError("a bool tensor holds bytes other than 0 and 1")
        return out
    if fmt == "fp32":
        return bytes_tensor(values, torch.float32, count).to(target)
    if fmt == "fp16":
        return bytes_tensor(values, torch.float16, count).to(target)
    q = bytes_tensor(values, torch.int8, count)
    s = bytes_tensor(scales, torch.float32, scale_count(fmt, count, chunk))
    return _dequantize_int8(q, s, chunk).to(target)


def _quantize_int8(v: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Symmetric, round-to-nearest: |v - q * scale| <= scale / 2 for every element, where
    # scale = max |v| over the element's chunk / 127.
    count = v.numel()
    full = count - count % chunk
    amax = []
    if full:
        amax.append(v[:full].view(-1, chunk).abs().amax(dim=1))
    if full < count:
        amax.append(v[full:].abs().amax().reshape(1))
    if not amax:
        return torch.empty(0, dtype=torch.int8), torch.empty(0, dtype=torch.float32)
    scales = torch.cat(amax) / INT8_LEVELS
    # An all-zero chunk has scale 0; dividing by 1 instead keeps its codes at 0.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.empty(count, dtype=torch.float32)
    if full:
        torch.div(
            v[:full].view(-1, chunk), safe[: full // chunk, None], out=q[:full].view(-1, chunk)
        )
    if full < count:
        torch.div(v[full:], safe[-1], out=q[full:])
    return q.round_().clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scales


def _dequantize_int8(q: torch.Tensor, scales: torch.Tensor, chunk: int) -> torch.Tensor:
    out = q.to(torch.float32)
    count = out.numel()
    full = count - count % chunk
    if full:
        out[:full].view(-1, chunk).mul_(scales[: full // chunk, None])
    if full < count:
        out[full:].mul_(scales[-1])
    return out
