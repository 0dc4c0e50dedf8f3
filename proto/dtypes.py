"""The tensor dtypes Archipelago carries, by the stable names the wire and files use.

The one table of them: graphs, `.opdag` files, tensor streams and compressed payloads all
name a dtype by these strings, so a header reads the same in every layer.
"""

from __future__ import annotations

import torch

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
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

FLOATING: frozenset[str] = frozenset({"float32", "float64", "float16", "bfloat16"})
