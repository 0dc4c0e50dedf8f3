"""Which way a peer transfer goes: a forward value or a backward gradient."""

from __future__ import annotations

from enum import StrEnum


class TransferKind(StrEnum):
    """The direction of one transfer between stages. A member is the very string the
    micro-batch schedule and the worker's logs use ("F", "B")."""

    FORWARD = "F"  # values of a micro-batch's forward pass (the Activations call)
    BACKWARD = "B"  # gradients of its backward pass (the Gradients call)

    @property
    def carries(self) -> str:
        """What a transfer of this kind carries, for messages: "values" or "gradients"."""
        return "values" if self is TransferKind.FORWARD else "gradients"
