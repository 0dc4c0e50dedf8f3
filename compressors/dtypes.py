"""The tensor dtypes a payload may describe, by the same stable names the OP-DAG IR uses."""

from __future__ import annotations

import torch

# Kept here rather than imported from opdag.ir so the package needs nothing of ours but
# the error class; the names match, so a header reads the same in both layers.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

FLOATING: frozenset[str] = frozenset({"float32", "float64", "float16", "bfloat16"})


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a supported dtype; ValueError for any other."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype {dtype} cannot be compressed (supported: {', '.join(DTYPES)})"
        ) from None


def itemsize(name: str) -> int:
    """Bytes per element of a dtype given by its stable name."""
    return DTYPES[name].itemsize
