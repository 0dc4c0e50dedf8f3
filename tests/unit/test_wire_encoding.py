"""The wire form of compressed tensors: index formats (int32, varint gaps, bitmap), the
flat header + bytes of a payload, and refusal — always `PayloadError`, with a message that
names the fault — of every inconsistent, truncated, hostile or fuzzed input."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from compressors import (
    ENCODINGS,
    HEADER_FIELDS,
    Payload,
    PayloadError,
    TopK,
    build_compressor,
    decode_payload,
    decode_wire,
    encode_dense,
    encode_sparse,
    payload_from_wire,
    payload_to_wire,
)
from compressors.index_coding import (
    decode_indices,
    encode_indices,
    estimated_index_bytes,
    index_bytes,
    smallest_index_format,
)
from opdag.errors import CodecError

pytestmark = pytest.mark.unit

SPARSE_FORMATS = ["int32", "varint", "bitmap"]


def reference_leb128(value: int) -> bytes:
    """Unsigned LEB128, one value at a time: the textbook definition, as the oracle."""
    out = bytearray()
    while True:
        seven, value = value & 0x7F, value >> 7
        out.append(seven | (0x80 if value else 0))
        if not value:
            return bytes(out)


def random_indices(numel: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(numel, size=count, replace=False)).astype(np.int64)


# --- index formats -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", SPARSE_FORMATS)
@pytest.mark.parametrize(
    ("numel", "indices"),
    [
        (1, [0]),
        (10, []),
        (10, list(range(10))),
        (1000, [0, 999]),
        (1000, [5, 6, 7, 500, 998]),
        (70_000, [0, 127, 128, 16_511, 16_512, 69_999]),  # gaps at the byte boundaries
    ],
)
def test_each_index_format_round_trips(fmt: str, numel: int, indices: list[int]) -> None:
    array = np.array(indices, dtype=np.int64)
    data = encode_indices(fmt, array, numel)
    assert len(data) == index_bytes(fmt, array, numel)
    assert np.array_equal(decode_indices(fmt, data, len(indices), numel), array)


def test_varint_gaps_are_leb128_of_index_minus_previous_minus_one() -> None:
    indices = np.array([0, 300, 301, 2**21 + 301, 2**31 - 2], dtype=np.int64)
    gaps = [0, 299, 0, 2**21 - 1, 2**31 - 2 - (2**21 + 301) - 1]
    expected = b"".join(reference_leb128(g) for g in gaps)
    assert encode_indices("varint", indices, 2**31 - 1) == expected
    assert reference_leb128(299) == b"\xab\x02"
    assert np.array_equal(decode_indices("varint", expected, 5, 2**31 - 1), indices)


def test_varint_coder_matches_the_reference_on_random_sets() -> None:
    for seed in range(5):
        numel = 10 ** (seed + 2)
        indices = random_indices(numel, numel // 50 + 1, seed)
        previous = np.concatenate([[-1], indices[:-1]])
        expected = b"".join(reference_leb128(int(g)) for g in indices - previous - 1)
        assert encode_indices("varint", indices, numel) == expected
        assert np.array_equal(decode_indices("varint", expected, indices.size, numel), indices)


@pytest.mark.parametrize("density", [0.001, 0.003, 0.01])
def test_varint_indices_are_at_least_twice_smaller_than_int32_at_sparse_densities(
    density: float,
) -> None:
    numel = 1_000_000
    uniform = random_indices(numel, int(numel * density), seed=1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2))
    largest = np.sort(torch.topk(x.abs(), int(numel * density)).indices.numpy())
    for indices in (uniform, largest):
        ratio = index_bytes("int32", indices, numel) / index_bytes("varint", indices, numel)
        assert ratio >= 2.0, (density, ratio)
        assert smallest_index_format(indices, numel) == "varint"


def test_smallest_format_is_chosen_and_recorded_in_the_encoding() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    sparse = TopK(ratio=0.01).compress(x)
    half = TopK(ratio=0.5).compress(x)
    assert sparse.encoding == "raw/varint"
    assert half.encoding == "raw/bitmap" and len(half.indices) == 100_000 // 8
    for fmt in SPARSE_FORMATS:  # a fixed format is honoured and decodes the same
        fixed = TopK(ratio=0.01, indices=fmt).compress(x)
        assert fixed.encoding == f"raw/{fmt}"
        assert torch.equal(decode_payload(fixed), decode_payload(sparse))
        assert len(fixed.indices) >= len(sparse.indices)


def test_estimated_index_bytes_is_close_for_uniform_indices() -> None:
    numel = 1_000_000
    for density in (0.001, 0.01, 0.1):
        count = int(numel * density)
        real = index_bytes("varint", random_indices(numel, count, seed=4), numel)
        assert abs(estimated_index_bytes("varint", count, numel) - real) <= 0.02 * real
    assert estimated_index_bytes("auto", 500_000, numel) == numel // 8  # bitmap wins
    assert estimated_index_bytes("int32", 10, numel) == 40


def test_index_encoder_refuses_unsorted_or_out_of_range_indices() -> None:
    with pytest.raises(ValueError, match="sorted"):
        encode_indices("varint", np.array([3, 2]), 10)
    with pytest.raises(ValueError, match="sorted"):
        encode_indices("int32", np.array([2, 2]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        encode_indices("bitmap", np.array([10]), 10)


# --- payload on the wire ------------------------------------------------------------------


def every_kind_of_payload() -> list[Payload]:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 100, generator=g)
    out = [
        encode_dense(x),
        encode_dense(x.double(), "fp32"),
        encode_dense(x, "fp16"),
        encode_dense(x, "int8", 64),
        encode_dense(torch.arange(7)),
        encode_dense(torch.tensor([True, False])),
        encode_dense(torch.empty(0, 3)),
    ]
    for values in ("raw", "fp32", "fp16", "int8"):
        for fmt in SPARSE_FORMATS:
            out.append(encode_sparse(x.bfloat16(), random_indices(1200, 30, 7), values, fmt, 16))
    out.append(encode_sparse(x, np.empty(0, dtype=np.int64), "raw", "varint"))
    return out


def test_every_encoding_round_trips_through_the_wire_form() -> None:
    payloads = every_kind_of_payload()
    assert {p.encoding for p in payloads} >= {e for e in ENCODINGS if not e.endswith("/dense")}
    for payload in payloads:
        header, data = payload_to_wire(payload)
        assert set(header) == set(HEADER_FIELDS)
        assert all(isinstance(v, int | str | list) for v in header.values())
        assert isinstance(data, bytes) and len(data) == payload.nbytes
        assert payload_from_wire(header, data) == payload
        y = decode_wire(header, data)
        assert y.shape == payload.shape and torch.equal(y, decode_payload(payload))


def wire_of(payload: Payload, **changes: Any) -> tuple[dict[str, Any], bytes]:
    header, data = payload_to_wire(payload)
    out: dict[str, Any] = dict(header)
    out.update(changes)
    return out, data


def sparse_payload(fmt: str, numel: int = 1000) -> Payload:
    x = torch.arange(1, numel + 1, dtype=torch.float32)
    return encode_sparse(x, np.array([1, 5, 9], dtype=np.int64), "raw", fmt)


def test_an_index_out_of_range_is_refused_naming_it() -> None:
    payload = sparse_payload("int32")
    bad = np.array([1, 5, 1000], dtype="<i4").tobytes()
    with pytest.raises(PayloadError, match=r"index 1000 out of range for 1000 elements"):
        decode_payload(Payload(**{**payload.__dict__, "indices": bad}))
    negative = np.array([-1, 5, 9], dtype="<i4").tobytes()
    with pytest.raises(PayloadError, match=r"index -1 out of range for 1000 elements"):
        decode_payload(Payload(**{**payload.__dict__, "indices": negative}))
    # varint: gaps that run past the end
    past = encode_indices("varint", np.array([1, 5, 1003]), 2000)
    varint = sparse_payload("varint")
    with pytest.raises(PayloadError, match=r"index 1003 out of range for 1000 elements"):
        decode_payload(Payload(**{**varint.__dict__, "indices": past}))
    huge_gap = b"\x01\x01\xff\xff\xff\xff\x07"  # third gap 2**31 - 1
    with pytest.raises(PayloadError, match=r"gap 2147483647 out of range for 1000"):
        decode_payload(Payload(**{**varint.__dict__, "indices": huge_gap}))


def test_indices_that_are_not_strictly_increasing_are_refused() -> None:
    payload = sparse_payload("int32")
    for order in ([5, 1, 9], [1, 5, 5]):
        data = np.array(order, dtype="<i4").tobytes()
        with pytest.raises(PayloadError, match="strictly increasing"):
            decode_payload(Payload(**{**payload.__dict__, "indices": data}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"values_bytes": 11, "indices_bytes": 4},
            r"values hold 11 bytes; 3 raw values .* need 12",
        ),
        ({"count": 4}, r"values hold 12 bytes; 4 raw values"),
        ({"count": 1001}, r"count 1001 exceeds the tensor's 1000 elements"),
        ({"count": -1}, r"count must be a non-negative int"),
        ({"dtype": "complex64"}, r"unknown dtype 'complex64'"),
        ({"dtype": 7}, r"'dtype' must be a string"),
        ({"dtype": "int64"}, r"cannot carry a int64 tensor"),
        ({"encoding": "zstd/varint"}, r"unknown encoding 'zstd/varint'"),
        ({"encoding": "raw/dense"}, r"dense encoding must keep all 1000 elements"),
        ({"encoding": "raw/int32"}, r"indices hold \d+ bytes; 3 int32 indices .* need 12"),
        ({"shape": [-5, 2]}, r"negative dimension -5"),
        ({"shape": [2**40, 2**40]}, r"more than the limit"),
        ({"shape": [10**400]}, r"more than the limit"),
        ({"shape": [1] * 33}, r"33 dimensions"),
        ({"shape": [10.0, 100]}, r"not an int"),
        ({"shape": [True]}, r"not an int"),
        ({"shape": "1000"}, r"shape must be a list"),
        ({"chunk": 4}, r"chunk must be 0 for raw values"),
        ({"version": 2}, r"wire version 2"),
        ({"values_bytes": -12, "indices_bytes": 4 + 12 + 12}, r"negative buffer length"),
        ({"values_bytes": 2**62}, r"header declares .* bytes .* the data holds"),
        ({"count": 2**100}, r"count <huge int> exceeds"),
        ({"count": "3"}, r"'count' must be an int"),
        ({"count": True}, r"'count' must be an int"),
    ],
)
def test_inconsistent_headers_are_refused_naming_the_fault(
    change: dict[str, Any], message: str
) -> None:
    header, data = wire_of(sparse_payload("varint"), **change)
    with pytest.raises(PayloadError, match=message):
        decode_wire(header, data)


def test_data_that_disagrees_with_the_header_is_refused() -> None:
    header, data = wire_of(sparse_payload("varint"))
    with pytest.raises(PayloadError, match=r"the data holds 14"):
        decode_wire(header, data[:-1])
    with pytest.raises(PayloadError, match=r"the data holds 16"):
        decode_wire(header, data + b"\x00")
    with pytest.raises(PayloadError, match=r"payload data must be bytes"):
        decode_wire(header, "text")  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match=r"lacks field 'count'"):
        decode_wire({k: v for k, v in header.items() if k != "count"}, data)
    with pytest.raises(PayloadError, match=r"unknown field 'extra'"):
        decode_wire({**header, "extra": 1}, data)
    with pytest.raises(PayloadError, match=r"header is a dict"):
        decode_wire([("count", 3)], data)  # type: ignore[arg-type]


def test_varint_streams_of_the_wrong_length_or_shape_are_refused() -> None:
    payload = sparse_payload("varint")
    for stream, message in [
        (b"\x01\x03\x83", r"ends in the middle of a value"),
        (b"\x01\x03\x03\x03", r"holds 4 values, header says 3"),
        (b"\x01\x01\x83\x83\x83\x83\x83\x03", r"value of 6 bytes"),
    ]:
        with pytest.raises(PayloadError, match=message):
            decode_payload(Payload(**{**payload.__dict__, "indices": stream}))


def test_bitmaps_that_disagree_with_the_count_or_the_shape_are_refused() -> None:
    payload = sparse_payload("bitmap", numel=1001)
    bits = bytearray(payload.indices)
    bits[0] |= 0x01  # a fourth entry
    with pytest.raises(PayloadError, match=r"bitmap marks 4 entries, header says 3"):
        decode_payload(Payload(**{**payload.__dict__, "indices": bytes(bits)}))
    bits = bytearray(payload.indices)
    bits[-1] |= 0x80  # element 1007 of 1001
    with pytest.raises(PayloadError, match=r"bits past the tensor's 1001 elements"):
        decode_payload(Payload(**{**payload.__dict__, "indices": bytes(bits)}))


def test_bool_bytes_other_than_zero_and_one_are_refused() -> None:
    header, _ = wire_of(encode_dense(torch.tensor([True, False])))
    with pytest.raises(PayloadError, match="bool"):
        decode_wire(header, b"\x01\x02")


def test_a_receiver_limit_refuses_a_huge_declared_shape_before_allocating() -> None:
    # Three kept values declaring a 2**30-element tensor: a few bytes, a 4 GiB output.
    payload = encode_sparse(torch.zeros(10), np.array([0, 1, 2]), "raw", "varint")
    header, data = wire_of(payload, shape=[2**15, 2**15])
    with pytest.raises(PayloadError, match=r"more than the limit of 268435456 elements"):
        decode_wire(header, data)
    with pytest.raises(PayloadError, match=r"more than the limit of 100 elements"):
        decode_wire(*wire_of(payload, shape=[101]), max_elements=100)
    assert decode_wire(*wire_of(payload, shape=[100]), max_elements=100).shape == (100,)


def test_payload_error_is_the_compressors_own_error() -> None:
    # compressors/ depends on nothing of opdag; the worker's edge compression turns a
    # PayloadError into opdag's CodecError naming the value (test_edge_compression.py).
    assert issubclass(PayloadError, ValueError)
    assert not issubclass(PayloadError, CodecError)


# --- fuzzing ------------------------------------------------------------------------------

MAX_FUZZ_ELEMENTS = 1 << 16


def _mutate(rng: random.Random, header: dict[str, Any], data: bytes) -> tuple[Any, Any]:
    header = dict(header)
    blob = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choices(range(9), weights=[6, 2, 2, 1, 1, 1, 1, 2, 1])[0]
        if kind == 0 and blob:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        elif kind == 1:  # truncate or extend
            if blob and rng.random() < 0.5:
                del blob[rng.randrange(len(blob)) :]
            else:
                blob += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 2:  # nudge an int field
            field = rng.choice(["count", "chunk", "values_bytes", "indices_bytes", "scales_bytes"])
            was = header.get(field)
            near = (was if isinstance(was, int) else 0) + rng.randint(-3, 3)
            header[field] = rng.choice([near, 0, -1, 2**31, 2**63, rng.randrange(10**6)])
        elif kind == 3:  # reshape
            header["shape"] = [
                rng.choice([0, 1, 7, -1, 2**20, 2**62]) for _ in range(rng.randint(0, 4))
            ]
        elif kind == 4:
            header["encoding"] = rng.choice([*ENCODINGS, "raw", "fp16/", "", "x/y/z"])
        elif kind == 5:
            header["dtype"] = rng.choice(["float32", "float16", "bfloat16", "int64", "bool", "f4"])
        elif kind == 6:  # wrong types
            field = rng.choice(list(header))
            header[field] = rng.choice([None, "1", 1.5, [1], {"a": 1}, b"\x00", True])
        elif kind == 7:  # lengths that agree with the data but split it wrongly
            total = len(blob)
            a = rng.randint(0, total)
            b = rng.randint(0, total - a)
            header.update(values_bytes=a, indices_bytes=b, scales_bytes=total - a - b)
        else:  # drop or add a field
            if rng.random() < 0.5:
                header.pop(rng.choice(list(header)))
            else:
                header["surplus"] = 1
    return header, bytes(blob)


def test_fuzzed_payloads_decode_to_their_declared_shape_or_raise_payload_error() -> None:
    rng = random.Random(20240607)
    seeds = [payload_to_wire(p) for p in every_kind_of_payload()]
    x = torch.randn(300)
    for spec in ("int8", {"topk": 0.1}, {"name": "topk", "ratio": 0.3, "values": "int8"}):
        seeds.append(payload_to_wire(build_compressor(spec).compress(x)))
    decoded = refused = 0
    for _ in range(1000):
        header, data = _mutate(rng, *rng.choice(seeds))
        try:
            y = decode_wire(header, data, max_elements=MAX_FUZZ_ELEMENTS)
        except PayloadError:
            refused += 1
            continue
        assert isinstance(y, torch.Tensor)
        assert list(y.shape) == header["shape"] and str(y.dtype) == f"torch.{header['dtype']}"
        decoded += 1
    assert refused > 500 and decoded > 20  # both outcomes were exercised


def test_a_payload_is_hashable_and_its_repr_shows_sizes_not_bytes() -> None:
    payload = encode_dense(torch.zeros(1000))
    same = Payload(**{**payload.__dict__, "shape": [1000]})
    assert same.shape == (1000,) and same == payload and hash(same) == hash(payload)
    assert repr(payload) == "Payload(raw/dense, float32[1000], count=1000, bytes=4000+0+0, chunk=0)"
