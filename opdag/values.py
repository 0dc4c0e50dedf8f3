"""Runtime values that flow along graph edges: tensors, Python scalars, and tuples of them.

A value that crosses stages is taken apart into its tensor leaves (which carry gradients) and
its structure; these helpers do that without caring what the value means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from opdag.errors import IRError
from opdag.ir import ValueMeta, dtype_name

Value = Any


def tensor_leaves(value: Value) -> list[torch.Tensor]:
    """The tensors inside a value, depth first."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensor_leaves(item)]
    return []


def map_tensors(value: Value, fn: Callable[[torch.Tensor], Any]) -> Value:
    """The same value with every tensor leaf replaced by `fn(leaf)`."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    return value


def meta_of(value: Value) -> ValueMeta:
    """Describe a runtime value."""
    if isinstance(value, torch.Tensor):
        return ValueMeta(
            kind="tensor",
            shape=tuple(int(d) for d in value.shape),
            dtype=dtype_name(value.dtype),
            requires_grad=value.requires_grad,
        )
    if isinstance(value, bool):
        return ValueMeta(kind="bool")
    if isinstance(value, int):
        return ValueMeta(kind="int")
    if isinstance(value, float):
        return ValueMeta(kind="float")
    if value is None:
        return ValueMeta(kind="none")
    if isinstance(value, torch.dtype):
        return ValueMeta(kind="dtype")
    if isinstance(value, torch.device):
        return ValueMeta(kind="device")
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        kind = "list" if isinstance(value, list) else "tuple"
        return ValueMeta(kind=kind, items=tuple(meta_of(v) for v in value))
    raise IRError(f"a node produced a {type(value).__name__}, which a graph cannot carry")


def value_nbytes(value: Value) -> int:
    """Bytes of the tensor leaves of a value."""
    return sum(t.numel() * t.element_size() for t in tensor_leaves(value))


def add_grads(a: Value, b: Value) -> Value:
    """Sum two gradients of the same value (None stands for zero)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, torch.Tensor):
        return a + b
    if isinstance(a, (tuple, list)):
        return type(a)(add_grads(x, y) for x, y in zip(a, b, strict=True))
    return None
