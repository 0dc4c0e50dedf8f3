"""Compression on a stage's cut links: what it sends is compressed where the plan says so,
and what it receives compressed is checked and decoded before anything uses it.

Forward: a float value sent on a link with a codec travels as that codec's payload (top-k:
the kept entries and their positions); the receiver rebuilds it dense, zeros where nothing
was kept, and remembers which entries were kept. Backward: the gradient of such a value is
the gradient through the kept entries only, so the receiver sends just those entries'
gradients - no positions, the sender still holds them from the forward - in the value
format the forward used; when that format is lossy (fp16, int8) an error-feedback residual
per value (`compressors.ErrorFeedback`) carries what the rounding lost into the next
micro-batch's gradient. The sender rebuilds the dense gradient from the positions it kept.

The bytes are the compressors' one wire form (`compressors.wire`); its header maps field
for field onto the stream's `CompressedLayout` and the tensor's dtype and shape. A
`PayloadError` from it is refused here as a `CodecError` naming the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from threading import Lock
from typing import Literal

import torch

from compressors import (
    Compressor,
    ErrorFeedback,
    KeptMask,
    Payload,
    PayloadError,
    WireHeader,
    build_compressor,
    decode_payload,
    encode_dense,
    masked_payload_from_wire,
    masked_payload_to_wire,
    payload_from_wire,
    payload_to_wire,
)
from compressors.wire import MASKED, WIRE_VERSION
from opdag.errors import CodecError
from opdag.ir import ValueMeta, dtype_name, dtype_of
from opdag.values import Value
from proto.dtypes import FLOATING
from proto.tensor_stream import CompressedLayout, EncodedTensor
from worker.transfer_kind import TransferKind


@dataclass(frozen=True)
class EdgeCodec:
    """How one link of a stage compresses what it sends (every float value on it)."""

    dst: int
    codec: str  # a compressor name: topk, sampled_topk, randk, fp16, int8
    ratio: float
    values: str  # raw | fp16 | int8: how kept entries travel

    def build(self) -> Compressor:
        options: dict[str, object] = {"values": self.values, "ratio": self.ratio}
        if self.codec in ("fp16", "int8", "none"):
            options = {}
        try:
            return build_compressor(self.codec, **options)
        except ValueError as e:
            raise CodecError(f"codec for stage {self.dst}: {e}") from None


def compressed_tensor(
    payload: Payload, indices: Literal["mask"] | None = None, shape: tuple[int, ...] | None = None
) -> EncodedTensor:
    """A payload as a tensor the stream carries. For a gradient sent at its forward's kept
    entries only, `indices` is "mask" (the positions are left out) and `shape` the dense
    shape (the payload holds just the kept values)."""
    if indices == MASKED:
        return _wire_tensor(*masked_payload_to_wire(payload, shape))
    return _wire_tensor(*payload_to_wire(payload))


def _wire_tensor(header: WireHeader, data: bytes) -> EncodedTensor:
    """The compressors' wire form as the tensor stream carries it: the header's buffer
    lengths and counts are the layout, its dtype and shape the tensor's."""
    layout = CompressedLayout(
        codec=header["encoding"],
        count=header["count"],
        chunk=header["chunk"],
        values_bytes=header["values_bytes"],
        indices_bytes=header["indices_bytes"],
        scales_bytes=header["scales_bytes"],
    )
    buffer = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    return EncodedTensor(dtype_of(header["dtype"]), tuple(header["shape"]), layout, buffer)


def _wire_header(t: EncodedTensor) -> WireHeader:
    """The compressors' header of a compressed tensor the stream delivered."""
    c = t.layout
    return WireHeader(
        version=WIRE_VERSION,
        encoding=c.codec,
        dtype=dtype_name(t.dtype),
        shape=list(t.shape),
        count=c.count,
        chunk=c.chunk,
        values_bytes=c.values_bytes,
        indices_bytes=c.indices_bytes,
        scales_bytes=c.scales_bytes,
    )


class EdgeCodecs:
    """One stage's codecs, the positions its compressed values kept, and its residuals."""

    def __init__(
        self,
        codecs: Mapping[int, EdgeCodec],
        metas: Mapping[str, ValueMeta],
        compressible: set[str],
    ) -> None:
        self._compressors = {dst: c.build() for dst, c in codecs.items()}
        self._metas = metas
        self._compressible = compressible
        # (step, micro-batch, value, dst) -> the payload sent, until its gradient returns.
        self._sent: dict[tuple[int, int, str, int], Payload] = {}
        # (step, micro-batch, value) -> the entries a received value kept, and its format.
        self._kept: dict[tuple[int, int, str], tuple[KeptMask, str]] = {}
        # Per value name: what rounding lost of the gradients sent back in a lossy format.
        self._residuals = ErrorFeedback()
        self._lock = Lock()

    @property
    def active(self) -> bool:
        return bool(self._compressors)

    # -- sending ----------------------------------------------------------------------------

    def encode_forward(
        self, step: int, mb: int, dst: int, values: Mapping[str, Value]
    ) -> dict[str, Value | EncodedTensor]:
        """The values for `dst`, its float tensors compressed if its link has a codec."""
        compressor = self._compressors.get(dst)
        if compressor is None:
            return dict(values)
        out: dict[str, Value | EncodedTensor] = {}
        for name, v in values.items():
            if (
                name not in self._compressible
                or not isinstance(v, torch.Tensor)
                or dtype_name(v.dtype) not in FLOATING
            ):
                out[name] = v
                continue
            payload = compressor.compress(v)
            meta = self._metas.get(name)
            if payload.is_sparse and meta is not None and meta.carries_grad:
                with self._lock:
                    self._sent[(step, mb, name, dst)] = payload
            out[name] = compressed_tensor(payload)
        return out

    def encode_backward(
        self, step: int, mb: int, dst: int, grads: Mapping[str, Value]
    ) -> dict[str, Value | EncodedTensor]:
        """The gradients for `dst`: those of values that arrived sparse go back as the
        kept entries only, in the forward's value format, with error feedback."""
        out: dict[str, Value | EncodedTensor] = {}
        for name, g in grads.items():
            with self._lock:
                kept = self._kept.pop((step, mb, name), None)
            if kept is None or not isinstance(g, torch.Tensor):
                out[name] = g
                continue
            mask, values_fmt = kept
            if values_fmt == "raw":
                payload = encode_dense(mask.gather(g), "raw")
            else:  # lossy: add what rounding lost last time, keep what it loses now
                payload = self._residuals.compress_kept(name, g.detach().cpu(), mask, values_fmt)
            out[name] = compressed_tensor(payload, MASKED, mask.shape)
        return out

    # -- receiving --------------------------------------------------------------------------

    def decode(
        self, kind: TransferKind, step: int, mb: int, src: int, values: dict[str, Value]
    ) -> None:
        """Replace, in place, every compressed tensor received with its dense tensor;
        CodecError names the value and whatever of it does not fit."""
        for name, v in list(values.items()):
            if not isinstance(v, EncodedTensor):
                if kind == TransferKind.BACKWARD:
                    with self._lock:
                        self._sent.pop((step, mb, name, src), None)
                continue
            meta = self._metas.get(name)
            if meta is None or meta.kind != "tensor":
                raise CodecError(f"value {name!r} cannot arrive compressed")
            numel = math.prod(meta.shape)
            values_fmt, _, index_fmt = v.layout.codec.partition("/")
            header, data = _wire_header(v), v.data.numpy().tobytes()
            try:
                if kind == TransferKind.FORWARD:
                    if index_fmt == MASKED:
                        raise CodecError(f"value {name!r}: a forward value must carry positions")
                    payload = payload_from_wire(header, data, max_elements=numel)
                    values[name] = decode_payload(payload, max_elements=numel)
                    mask = KeptMask.from_payload(payload, max_elements=numel)
                    if mask is not None and meta.carries_grad:
                        with self._lock:
                            self._kept[(step, mb, name)] = (mask, values_fmt)
                    continue
                if index_fmt != MASKED:
                    raise CodecError(f"gradient {name!r}: gradients come back only masked")
                with self._lock:
                    sent = self._sent.pop((step, mb, name, src), None)
                if sent is None:
                    raise CodecError(
                        f"gradient {name!r} of step {step}, micro-batch {mb} arrived masked, "
                        f"but its value went to stage {src} uncompressed"
                    )
                payload = masked_payload_from_wire(header, data, sent)
                values[name] = decode_payload(payload, max_elements=numel)
            except PayloadError as e:
                what = "value" if kind == TransferKind.FORWARD else "gradient"
                raise CodecError(f"{what} {name!r}: {e}") from None

    def forget(self, step: int) -> None:
        """Drop what is kept for `step` (a step abandoned, or finished)."""
        with self._lock:
            for key in [k for k in self._sent if k[0] <= step]:
                del self._sent[key]
            for k2 in [k for k in self._kept if k[0] <= step]:
                del self._kept[k2]
