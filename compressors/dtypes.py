"""Dtype look-ups for payloads, over the one dtype table (`proto.dtypes`)."""

from __future__ import annotations

import torch

from proto.dtypes import DTYPE_NAMES, DTYPES, FLOATING

__all__ = ["DTYPES", "FLOATING", "dtype_name", "itemsize"]


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a supported dtype; ValueError for any other."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot be compressed (supported: {', '.join(DTYPES)})"
        ) from None


def itemsize(name: str) -> int:
    """Bytes per element of a dtype given by its stable name."""
    return DTYPES[name].itemsize
