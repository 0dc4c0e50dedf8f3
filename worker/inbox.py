"""What a stage receives from its peers, checked and kept until its schedule needs it.

`check_value` refuses a value or gradient whose structure, dtype or shape differs from the
stage graph's description; `Inbox` holds each micro-batch's arrivals by kind and sender.
"""

from __future__ import annotations

import asyncio

import torch

from opdag.errors import CodecError
from opdag.ir import ValueMeta, dtype_name
from opdag.values import Value
from worker.transfer_kind import TransferKind


def check_value(value: Value, meta: ValueMeta, what: str, *, grad: bool = False) -> None:
    """Refuse a received value whose structure, dtype or shape differs from the graph's."""
    if grad and value is None:
        return
    if meta.kind == "tensor":
        if not isinstance(value, torch.Tensor):
            raise CodecError(f"{what}: expected a tensor, got {type(value).__name__}")
        if dtype_name(value.dtype) != meta.dtype or tuple(value.shape) != meta.shape:
            raise CodecError(
                f"{what}: expected {meta.dtype}{list(meta.shape)}, got "
                f"{dtype_name(value.dtype)}{list(value.shape)}"
            )
    elif meta.kind in ("tuple", "list"):
        if not isinstance(value, (tuple, list)) or len(value) != len(meta.items):
            raise CodecError(f"{what}: expected a {meta.kind} of {len(meta.items)} values")
        for i, (v, m) in enumerate(zip(value, meta.items, strict=True)):
            check_value(v, m, f"{what}[{i}]", grad=grad)
    elif grad:
        if value is not None:
            raise CodecError(f"{what}: a {meta.kind} carries no gradient")
    else:
        kinds = {
            "int": int,
            "float": float,
            "bool": bool,
            "dtype": torch.dtype,
            "device": torch.device,
        }
        expected = kinds.get(meta.kind)
        if meta.kind == "none":
            if value is not None:
                raise CodecError(f"{what}: expected None")
        elif (
            expected is None
            or not isinstance(value, expected)
            or (meta.kind == "int" and isinstance(value, bool))
        ):
            raise CodecError(f"{what}: expected a {meta.kind}, got {type(value).__name__}")


class Inbox:
    """Received values and gradients, waiting for the schedule to reach them."""

    def __init__(self) -> None:
        self._items: dict[tuple[TransferKind, int, int], dict[int, dict[str, Value]]] = {}
        self._changed = asyncio.Condition()

    async def put(
        self, kind: TransferKind, step: int, mb: int, src: int, values: dict[str, Value]
    ) -> None:
        async with self._changed:
            slot = self._items.setdefault((kind, step, mb), {})
            if src in slot:
                raise CodecError(
                    f"{kind} values of step {step}, micro-batch {mb} from stage {src} arrived twice"
                )
            slot[src] = values
            self._changed.notify_all()

    async def take(
        self, kind: TransferKind, step: int, mb: int, srcs: set[int]
    ) -> dict[int, dict[str, Value]]:
        key = (kind, step, mb)
        async with self._changed:
            await self._changed.wait_for(lambda: srcs <= set(self._items.get(key, {})))
            return self._items.pop(key)

    def __len__(self) -> int:
        return len(self._items)
