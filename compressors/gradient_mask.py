"""The backward rule of a sparsified edge: the forward pass sent only the kept entries,
so the gradient reaching the sender flows only through those entries.

Either side may apply the mask: the receiver before sending the gradient back (which
then is sparse with the forward's own indices), or the sender on arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from compressors.encoding import DEFAULT_MAX_ELEMENTS, kept_indices
from compressors.payload import Payload


@dataclass(frozen=True, eq=False)  # a tensor field has no plain equality
class KeptMask:
    """The entries a forward payload kept: its shape and sorted flat indices."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, sorted, distinct, in [0, numel)

    @classmethod
    def from_payload(
        cls, payload: Payload, *, max_elements: int = DEFAULT_MAX_ELEMENTS
    ) -> KeptMask | None:
        """The mask of a sparse payload; None for a dense one (every entry kept)."""
        indices = kept_indices(payload, max_elements=max_elements)
        if indices is None:
            return None
        return cls(shape=payload.shape, indices=indices)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_bool(self) -> torch.Tensor:
        """The mask as a bool tensor of the edge's shape."""
        mask = torch.zeros(self.numel, dtype=torch.bool)
        mask[self.indices] = True
        return mask.reshape(self.shape)

    def apply(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` with every entry the forward pass dropped set to zero (a new tensor)."""
        if tuple(grad.shape) != self.shape:
            raise ValueError(
                f"gradient has shape {list(grad.shape)}, the forward payload {list(self.shape)}"
            )
        flat = grad.detach().reshape(-1)
        indices = self.indices.to(flat.device)
        out = torch.zeros_like(flat)
        out[indices] = flat[indices]
        return out.reshape(grad.shape)

    def gather(self, grad: torch.Tensor) -> torch.Tensor:
        """The kept entries of `grad`, in index order: all a gradient on this edge carries."""
        if tuple(grad.shape) != self.shape:
            raise ValueError(
                f"gradient has shape {list(grad.shape)}, the forward payload {list(self.shape)}"
            )
        return grad.detach().reshape(-1)[self.indices.to(grad.device)]
