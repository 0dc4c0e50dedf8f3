"""Error feedback: what a lossy compressor dropped from one transfer is added back into
the next transfer on the same edge, so over steps nothing is lost, only delayed.

Also for a gradient through a sparsified edge, which is due only at the entries the
forward payload kept: `compress_kept` sends those entries in a lossy value format and
keeps what the rounding lost there."""

from __future__ import annotations

import torch

from compressors.compressor import Compressor
from compressors.dtypes import FLOATING, dtype_name
from compressors.encoding import decode_payload, encode_dense
from compressors.gradient_mask import KeptMask
from compressors.payload import Payload


class ErrorFeedback:
    """Residuals of lossy compression, one per stable edge name.

    `compress(key, x, compressor)` compresses `x + residual[key]` and stores what that
    lost: `x + residual - decompress(payload)`. The two halves, `corrected` and `record`,
    are public for a caller that compresses in between itself. Integer and bool tensors
    are sent unchanged by every compressor and keep no residual.
    """

    def __init__(self) -> None:
        self._residuals: dict[str, torch.Tensor] = {}

    def corrected(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """`x` plus the residual stored for `key` (just `x` when there is none)."""
        residual = self._residuals.get(key)
        if residual is None:
            return x
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"edge {key!r}: tensor is {x.dtype}{list(x.shape)} but its residual is "
                f"{residual.dtype}{list(residual.shape)}; reset({key!r}) when an edge changes"
            )
        return x.detach() + residual.to(x.device)

    def record(self, key: str, corrected: torch.Tensor, payload: Payload) -> None:
        """Store what compressing `corrected` into `payload` dropped, as `key`'s residual."""
        if dtype_name(corrected.dtype) not in FLOATING:
            self._residuals.pop(key, None)
            return
        sent = decode_payload(payload)
        self._residuals[key] = corrected.detach().to("cpu") - sent

    def compress(self, key: str, x: torch.Tensor, compressor: Compressor) -> Payload:
        """Compress `x` with the residual of `key` added, and keep the new residual."""
        corrected = self.corrected(key, x)
        payload = compressor.compress(corrected)
        self.record(key, corrected, payload)
        return payload

    def compress_kept(self, key: str, x: torch.Tensor, mask: KeptMask, values: str) -> Payload:
        """The entries `mask` kept of `x` plus `key`'s residual, as a dense payload in value
        format `values`; the new residual is what that format's rounding lost at those
        entries (the others owe nothing: the forward pass sent nothing there)."""
        corrected = self.corrected(key, x)
        picked = mask.gather(corrected)
        payload = encode_dense(picked, values)
        lost = torch.zeros(mask.numel, dtype=picked.dtype)
        lost[mask.indices] = picked - decode_payload(payload)
        self._residuals[key] = lost.reshape(corrected.shape)
        return payload

    def residual(self, key: str) -> torch.Tensor | None:
        """The residual stored for `key`, or None."""
        return self._residuals.get(key)

    def reset(self, key: str | None = None) -> None:
        """Forget the residual of `key`, or of every edge."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def __getitem__(self, key: str) -> torch.Tensor:
        """The residual stored for `key`; KeyError when there is none."""
        return self._residuals[key]

    def keys(self) -> list[str]:
        """The edges that hold a residual."""
        return list(self._residuals)
