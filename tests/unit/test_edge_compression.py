"""A stage's link codecs end to end in one process, with the wire in between: what the
sender compresses, the stream carries and the receiver decodes; gradients back through the
kept entries only; and refusals of what does not fit."""

from __future__ import annotations

import pytest
import torch

from opdag.errors import CodecError
from opdag.ir import tensor_meta
from opdag.values import Value
from proto.errors import WireError
from proto.tensor_stream import (
    EncodedTensor,
    TensorAssembler,
    encode_values,
    header_of,
    iter_chunks,
)
from proto.tensor_stream import decode_values as wire_decode
from worker.edge_compression import EdgeCodec, EdgeCodecs

pytestmark = pytest.mark.unit

SHAPE = (4, 8, 16)
METAS = {"h": tensor_meta(SHAPE, "float32", requires_grad=True)}


def over_the_wire(values: dict[str, Value | EncodedTensor]) -> dict[str, Value]:
    """`values` sent through a real stream: headers, 1 MiB chunks, the receiver's checks."""
    named, tensors = encode_values(values)
    headers = [header_of(n, t) for n, t in tensors]
    assembler = TensorAssembler(headers, max_bytes=1 << 24, compressed=True)
    for chunk in iter_chunks([t for _, t in tensors]):
        assembler.feed(chunk)
    return wire_decode(named, [t for _, t in assembler.finish_wire()], device=torch.device("cpu"))


def pair(codec: str, ratio: float, values: str) -> tuple[EdgeCodecs, EdgeCodecs]:
    sender = EdgeCodecs({1: EdgeCodec(1, codec, ratio, values)}, METAS, {"h"})
    receiver = EdgeCodecs({}, METAS, set())
    return sender, receiver


def test_topk_forward_keeps_the_largest_entries_and_gradient_flows_through_them() -> None:
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    sender, receiver = pair("topk", 0.1, "raw")
    received = over_the_wire(sender.encode_forward(3, 1, 1, {"h": x}))
    receiver.decode("F", 3, 1, 0, received)
    h = received["h"]
    kept = h != 0
    k = round(0.1 * x.numel())
    assert int(kept.sum()) == k
    assert torch.equal(h[kept], x[kept])  # kept entries exact
    assert x.abs()[kept].min() >= x.abs()[~kept].max()  # and the largest
    g = torch.randn(SHAPE)
    back = over_the_wire(receiver.encode_backward(3, 1, 0, {"h": g}))
    assert isinstance(back["h"], EncodedTensor)
    assert back["h"].layout.indices_bytes == 0  # positions are not sent back
    assert back["h"].nbytes == k * 4
    sender.decode("B", 3, 1, 1, back)
    assert torch.equal(back["h"], torch.where(kept, g, torch.zeros(())))


def test_ratio_one_is_bit_exact_both_ways() -> None:
    x, g = torch.randn(SHAPE), torch.randn(SHAPE)
    sender, receiver = pair("sampled_topk", 1.0, "raw")
    received = over_the_wire(sender.encode_forward(0, 0, 1, {"h": x}))
    receiver.decode("F", 0, 0, 0, received)
    assert torch.equal(received["h"], x)
    back = over_the_wire(receiver.encode_backward(0, 0, 0, {"h": g}))
    sender.decode("B", 0, 0, 1, back)
    assert torch.equal(back["h"], g)


def test_fp16_gradients_carry_their_rounding_error_forward() -> None:
    torch.manual_seed(1)
    x = torch.randn(SHAPE)  # the same activation twice: the same entries are kept
    sender, receiver = pair("topk", 0.25, "fp16")
    sent_total = torch.zeros(SHAPE)
    true_total = torch.zeros(SHAPE)
    for mb in range(2):
        received = over_the_wire(sender.encode_forward(0, mb, 1, {"h": x}))
        receiver.decode("F", 0, mb, 0, received)
        kept = received["h"] != 0
        g = torch.randn(SHAPE) * 1e-3 + 1.0  # values fp16 must round
        back = over_the_wire(receiver.encode_backward(0, mb, 0, {"h": g}))
        sender.decode("B", 0, mb, 1, back)
        assert torch.equal(back["h"][~kept], torch.zeros(int((~kept).sum())))
        sent_total += back["h"]
        true_total += torch.where(kept, g, torch.zeros(()))
        residual = receiver._residuals["h"]
        # The residual holds exactly what rounding lost of what was due to be sent.
        due = true_total - (sent_total - back["h"])  # this gradient plus the last residual
        assert torch.allclose(back["h"] + residual, torch.where(kept, due, torch.zeros(())))
    # So the error does not pile up: the sums differ by the last rounding alone.
    assert (sent_total - true_total).abs().max() <= 2**-11  # half an fp16 step near 1.0
    assert torch.allclose(sent_total + residual, true_total, atol=1e-6)


def test_masked_gradient_without_its_forward_is_refused() -> None:
    x, g = torch.randn(SHAPE), torch.randn(SHAPE)
    sender, receiver = pair("topk", 0.1, "raw")
    received = over_the_wire(sender.encode_forward(0, 0, 1, {"h": x}))
    receiver.decode("F", 0, 0, 0, received)
    back = over_the_wire(receiver.encode_backward(0, 0, 0, {"h": g}))
    stranger = EdgeCodecs({}, METAS, set())
    with pytest.raises(CodecError, match="arrived masked"):
        stranger.decode("B", 0, 0, 1, dict(back))
    with pytest.raises(CodecError, match="arrived masked"):
        sender.decode("B", 0, 1, 1, dict(back))  # another micro-batch's gradient


def test_forward_payload_with_an_index_out_of_range_is_refused() -> None:
    x = torch.randn(SHAPE)
    sender, receiver = pair("topk", 0.05, "raw")
    wire = sender.encode_forward(0, 0, 1, {"h": x})
    enc = wire["h"]
    assert isinstance(enc, EncodedTensor)
    lie = EncodedTensor(enc.dtype, (2, 8, 16), enc.layout, enc.data)  # half the elements
    with pytest.raises(CodecError, match="value 'h'"):
        receiver.decode("F", 0, 0, 0, {"h": lie})
    wrong = EncodedTensor(enc.dtype, enc.shape, enc.layout, enc.data[:-1])
    with pytest.raises(CodecError):
        receiver.decode("F", 0, 0, 0, {"h": wrong})


def test_stream_refuses_compressed_tensors_where_none_may_arrive() -> None:
    sender, _ = pair("topk", 0.1, "raw")
    _, tensors = encode_values(sender.encode_forward(0, 0, 1, {"h": torch.randn(SHAPE)}))
    headers = [header_of(n, t) for n, t in tensors]
    with pytest.raises(WireError, match="unknown encoding 'compressed'"):
        TensorAssembler(headers, max_bytes=1 << 24)
    headers[0].compressed.values_bytes += 1
    with pytest.raises(WireError, match="must account for"):
        TensorAssembler(headers, max_bytes=1 << 24, compressed=True)


def test_data_and_integer_values_pass_unchanged() -> None:
    tokens = torch.arange(12).reshape(3, 4)
    codecs = EdgeCodecs({1: EdgeCodec(1, "topk", 0.1, "raw")}, METAS, {"h"})
    image = torch.randn(2, 3)
    out = codecs.encode_forward(0, 0, 1, {"tokens": tokens, "image": image})
    assert out["tokens"] is tokens and out["image"] is image
