"""What a stage receives from its peers, checked and kept until its schedule needs it.

`check_value` refuses a value or gradient whose structure, dtype or shape differs from the
stage graph's description; `Inbox` holds each micro-batch's arrivals by kind and sender,
for the steps the schedule can have in flight only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


# A stage's schedule has at most this many steps past its current one in flight: a sender
# starts step k + 2 only once it has this stage's gradients of step k + 1 (or, sending no
# gradient-carrying value, once the stages after it have, which they get only after this
# one has run step k + 1's forwards).
STEPS_AHEAD = 1


class Inbox:
    """Received values and gradients, waiting for the schedule to reach them.

    It keeps only what the schedule can have in flight: messages for the current step
    (`current_step()`) and the `STEPS_AHEAD` after it, and at most `depth` of them (the
    micro-batches of those steps, from each of `senders` peer stages). Anything else is
    refused, so a peer cannot fill a worker's memory with far-future steps."""

    def __init__(
        self,
        *,
        current_step: Callable[[], int] = lambda: 0,
        micro_batches: int = 1,
        senders: int = 1,
    ) -> None:
        self._items: dict[tuple[TransferKind, int, int], dict[int, dict[str, Value]]] = {}
        self._changed = asyncio.Condition()
        self._current_step = current_step
        self.depth = (1 + STEPS_AHEAD) * max(1, micro_batches) * max(1, senders)
        self._held = 0  # messages held, over every key

    async def put(
        self, kind: TransferKind, step: int, mb: int, src: int, values: dict[str, Value]
    ) -> None:
        now = self._current_step()
        if step > now + STEPS_AHEAD:
            raise CodecError(
                f"{kind.carries} of step {step} from stage {src} arrived while this stage runs "
                f"step {now}: it keeps messages for steps {now} to {now + STEPS_AHEAD} only "
                "(its schedule's in-flight window)"
            )
        async with self._changed:
            if self._held >= self.depth:
                raise CodecError(
                    f"{kind.carries} of step {step} from stage {src} refused: this stage holds "
                    f"{self._held} messages, all its schedule can have in flight"
                )
            slot = self._items.setdefault((kind, step, mb), {})
            if src in slot:
                raise CodecError(
                    f"{kind} values of step {step}, micro-batch {mb} from stage {src} arrived twice"
                )
            slot[src] = values
            self._held += 1
            self._changed.notify_all()

    async def take(
        self, kind: TransferKind, step: int, mb: int, srcs: set[int]
    ) -> dict[int, dict[str, Value]]:
        key = (kind, step, mb)
        async with self._changed:
            await self._changed.wait_for(lambda: srcs <= set(self._items.get(key, {})))
            taken = self._items.pop(key)
            self._held -= len(taken)
            return taken

    def __len__(self) -> int:
        return len(self._items)
