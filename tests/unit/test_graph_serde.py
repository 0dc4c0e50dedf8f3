"""The codec and the `.opdag` file: lossless round trips, and refusal (always `CodecError`) of
truncated, corrupt, inconsistent and malicious input.

Files are taken apart and put back together here with the documented layout (`struct` and
`zlib.crc32`), not with the codec's own helpers, so a test that crafts a file with a valid
checksum checks the codec's *semantic* refusal and not its checksum.
"""

from __future__ import annotations

import dataclasses
import random
import re
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opdag import graph_serde, model_file
from opdag.capture import capture
from opdag.errors import CodecError, IRError
from opdag.ir import (
    DTYPES,
    LOCAL_DEVICE,
    CapturedModel,
    Graph,
    ListArg,
    LocalDevice,
    Node,
    NodeRef,
    ParamSpec,
    SliceArg,
    ValueMeta,
)
from opdag.stage import StageModule
from opdag.zoo import ZOO_NAMES, build_model, example_batch
from proto import opdag_pb2, tensor_pb2

pytestmark = pytest.mark.unit

TINY: dict[str, dict[str, Any]] = {
    "gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16},
    "moe-gpt": {"layers": 2, "d_model": 32, "heads": 2, "context": 16, "experts": 3},
    "resnet": {"widths": (8, 16), "blocks": (1, 2)},
    "mlp": {"hidden": 32, "layers": 3},
}

# The documented layout: magic, u32 version, then records `kind | u64 length | payload | crc32`.
MAGIC = b"\x89OPDAG\r\n"
HEADER = struct.Struct("<8sI")
RECORD = struct.Struct("<cQ")
CRC = struct.Struct("<I")
TRUNCATED = re.compile("truncated|corrupt")


def record(kind: bytes, payload: bytes) -> bytes:
    """One record with a valid checksum."""
    return RECORD.pack(kind, len(payload)) + payload + CRC.pack(zlib.crc32(payload))


def opdag_file(*records: bytes, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return HEADER.pack(magic, version) + b"".join(records)


def split_records(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (kind, payload) records of a well-formed file, checking the layout on the way."""
    magic, version = HEADER.unpack_from(data)
    assert (magic, version) == (MAGIC, 1)
    offset, out = HEADER.size, []
    while offset < len(data):
        kind, length = RECORD.unpack_from(data, offset)
        start = offset + RECORD.size
        payload = data[start : start + length]
        assert CRC.unpack_from(data, start + length)[0] == zlib.crc32(payload)
        out.append((kind, payload))
        offset = start + length + CRC.size
    assert offset == len(data)
    return out


def record_boundaries(data: bytes) -> list[int]:
    """Offsets where the header ends and each record starts or ends (the last is len(data))."""
    bounds, offset = [HEADER.size], HEADER.size
    while offset < len(data):
        _, length = RECORD.unpack_from(data, offset)
        offset += RECORD.size + length + CRC.size
        bounds.append(offset)
    return bounds


class Victim(nn.Module):
    """A small model touching every kind of node: input, param, ATen and Python operators."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.fc(x))) * self.scale
        h = torch.add(h.to(torch.float32), 1.0)
        n = h.shape[0]
        return F.mse_loss(h.reshape(n, -1), y)


@pytest.fixture(scope="module")
def zoo() -> dict[str, CapturedModel]:
    return {
        name: capture(
            build_model(name, TINY[name], seed=3), example_batch(name, TINY[name], 2, device="meta")
        )
        for name in ZOO_NAMES
    }


@pytest.fixture(scope="module")
def victim() -> CapturedModel:
    torch.manual_seed(0)
    return capture(Victim(), {"x": torch.zeros(2, 8), "y": torch.zeros(2, 8)})


@pytest.fixture(scope="module")
def victim_file(victim: CapturedModel) -> bytes:
    return model_file.encode_model(victim)


def refuse(data: bytes, pattern: str = "") -> str:
    """Decode a model that must be refused with a CodecError matching `pattern`."""
    with pytest.raises(CodecError) as info:
        model_file.decode_model(data)
    message = str(info.value)
    assert re.search(pattern, message), message
    return message


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_model_round_trips_byte_identically_and_losslessly(
    zoo: dict[str, CapturedModel], name: str
) -> None:
    model = zoo[name]
    data = model_file.encode_model(model)
    assert model_file.encode_model(model) == data, "encoding is not deterministic"
    decoded = model_file.decode_model(data)
    assert decoded.graph == model.graph
    assert model_file.encode_model(decoded) == data
    assert list(decoded.state) == [p.name for p in model.graph.params]
    for key, original in model.state.items():
        got = decoded.state[key]
        assert got.dtype == original.dtype and got.shape == original.shape, key
        assert torch.equal(got, original), key
    # The layout is as documented: one graph record, one tensor per parameter in the
    # graph's order, an empty end record.
    records = split_records(data)
    assert [k for k, _ in records] == [b"G"] + [b"T"] * len(model.graph.params) + [b"E"]
    assert records[-1][1] == b""
    assert graph_serde.decode_graph(records[0][1]) == model.graph
    names = [graph_serde.decode_tensor(payload)[0] for _, payload in records[1:-1]]
    assert names == [p.name for p in model.graph.params]


def test_crafted_records_have_the_codecs_own_layout() -> None:
    for kind, payload in ((b"G", b"abc"), (b"T", bytes(range(256))), (b"E", b"")):
        assert record(kind, payload) == model_file._record(kind, payload)
    assert HEADER.pack(MAGIC, 1) == model_file._HEADER.pack(
        model_file.MAGIC, model_file.FORMAT_VERSION
    )


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_save_then_load_gives_the_same_bytes_and_leaves_no_partial_file(
    zoo: dict[str, CapturedModel], name: str, tmp_path: Path
) -> None:
    path = tmp_path / f"{name}.opdag"
    model_file.save(zoo[name], path)
    data = model_file.encode_model(zoo[name])
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    loaded = model_file.load(path)
    assert loaded.graph == zoo[name].graph
    assert model_file.encode_model(loaded) == data
    # Saving over an existing file replaces it whole.
    model_file.save(zoo["mlp"], path)
    assert path.read_bytes() == model_file.encode_model(zoo["mlp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_failed_save_keeps_the_previous_file_and_leaves_no_partial_file(
    victim: CapturedModel, tmp_path: Path
) -> None:
    path = tmp_path / "model.opdag"
    model_file.save(victim, path)
    before = path.read_bytes()
    missing = CapturedModel(victim.graph, {k: v for k, v in victim.state.items() if k != "scale"})
    with pytest.raises(CodecError, match=r"tensors missing for parameters \['scale'\]"):
        model_file.save(missing, path)
    # Fails half-way: the graph and the tensors before `scale` are written when it is reached.
    unwritable = CapturedModel(
        victim.graph, {**victim.state, "scale": torch.ones(8, dtype=torch.complex64)}
    )
    with pytest.raises(IRError, match="complex64"):
        model_file.save(unwritable, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_loading_a_missing_file_or_a_directory_is_a_codec_error(tmp_path: Path) -> None:
    with pytest.raises(CodecError, match="cannot read"):
        model_file.load(tmp_path / "absent.opdag")
    with pytest.raises(CodecError, match="cannot read"):
        model_file.load(tmp_path)


# -- truncation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_truncated_file_is_refused_at_every_record_boundary(
    zoo: dict[str, CapturedModel], name: str
) -> None:
    data = model_file.encode_model(zoo[name])
    bounds = record_boundaries(data)
    assert bounds[-1] == len(data) and len(bounds) == len(zoo[name].graph.params) + 3
    cuts = set()
    for start in bounds[:-1]:
        # The record's start, and inside it: mid-header, after the header, mid-payload,
        # before and inside the checksum.
        _, length = RECORD.unpack_from(data, start)
        body = start + RECORD.size
        cuts |= {start, start + 4, body, body + length // 2, body + length, body + length + 2}
    cuts = {c for c in cuts if c < len(data)}
    for cut in sorted(cuts):
        refuse(data[:cut], TRUNCATED.pattern)


def test_file_cut_inside_its_header_is_refused_as_truncated(victim_file: bytes) -> None:
    for cut in range(HEADER.size):
        refuse(victim_file[:cut], "truncated")


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_file_cut_at_random_positions_is_refused(zoo: dict[str, CapturedModel], name: str) -> None:
    data = model_file.encode_model(zoo[name])
    rng = random.Random(f"truncate-{name}")
    for cut in rng.sample(range(len(data)), 40):
        refuse(data[:cut], TRUNCATED.pattern)


# -- corruption ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_single_bit_flips_are_refused(zoo: dict[str, CapturedModel], name: str) -> None:
    data = model_file.encode_model(zoo[name])
    rng = random.Random(f"flip-{name}")
    # Random positions, plus every byte of the header and of the first record's framing.
    positions = rng.sample(range(len(data)), 60) + list(range(HEADER.size + RECORD.size))
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        refuse(bytes(flipped))


def test_wrong_magic_is_refused(victim_file: bytes) -> None:
    refuse(b"PK\x03\x04" + victim_file[4:], "not an .opdag file")
    refuse(b"\x80" + victim_file[1:], "not an .opdag file")


def test_other_format_version_is_refused(victim_file: bytes) -> None:
    body = victim_file[HEADER.size :]
    for version in (0, 2, 0xFFFFFFFF):
        message = refuse(HEADER.pack(MAGIC, version) + body, "format version")
        assert str(version) in message


def test_unknown_record_kind_is_refused(victim_file: bytes) -> None:
    records = split_records(victim_file)
    data = opdag_file(
        record(*records[0]), record(b"X", b"payload"), *[record(*r) for r in records[1:]]
    )
    refuse(data, r"unknown record kind b'X' at record 1")


def test_second_graph_record_is_refused(victim_file: bytes) -> None:
    records = [record(*r) for r in split_records(victim_file)]
    refuse(opdag_file(records[0], records[0], *records[1:]), "second graph record")


def test_tensor_record_before_the_graph_is_refused(victim_file: bytes) -> None:
    records = [record(*r) for r in split_records(victim_file)]
    refuse(opdag_file(records[1], records[0], *records[2:]), "comes before the graph")


def test_file_without_a_graph_is_refused() -> None:
    refuse(opdag_file(record(b"E", b"")), "has no graph")


@pytest.mark.parametrize("extra", [b"\x00", record(b"E", b""), b"trailing garbage"])
def test_bytes_after_the_end_record_are_refused(victim_file: bytes, extra: bytes) -> None:
    refuse(victim_file + extra, "after the end record")


def test_record_length_beyond_the_file_is_refused_before_reading(victim_file: bytes) -> None:
    for length in (len(victim_file), 1 << 40, (1 << 64) - 1):
        refuse(HEADER.pack(MAGIC, 1) + RECORD.pack(b"G", length) + b"x" * 64, "claims")


def test_tensor_that_is_not_a_parameter_is_refused(victim_file: bytes) -> None:
    records = [record(*r) for r in split_records(victim_file)]
    ghost = record(b"T", graph_serde.encode_tensor("ghost", torch.zeros(3)))
    refuse(opdag_file(*records[:-1], ghost, records[-1]), r"\['ghost'\] are not parameters")


def test_missing_tensor_is_refused(victim: CapturedModel, victim_file: bytes) -> None:
    records = split_records(victim_file)
    kept = [
        r for r in records if not (r[0] == b"T" and graph_serde.decode_tensor(r[1])[0] == "fc.bias")
    ]
    assert len(kept) == len(records) - 1
    refuse(opdag_file(*[record(*r) for r in kept]), r"missing \['fc.bias'\]")


def test_tensor_appearing_twice_is_refused(victim_file: bytes) -> None:
    records = [record(*r) for r in split_records(victim_file)]
    refuse(opdag_file(*records[:2], records[1], *records[2:]), "appears twice")


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(8, 4), torch.zeros(64), torch.zeros(8, 8, dtype=torch.float64)],
    ids=["transposed-shape", "flattened", "float64"],
)
def test_tensor_disagreeing_with_its_param_spec_is_refused(
    victim_file: bytes, tensor: torch.Tensor
) -> None:
    records = split_records(victim_file)
    swapped = [
        record(b"T", graph_serde.encode_tensor("fc.weight", tensor))
        if kind == b"T" and graph_serde.decode_tensor(payload)[0] == "fc.weight"
        else record(kind, payload)
        for kind, payload in records
    ]
    refuse(opdag_file(*swapped), r"tensor 'fc.weight' is .* the graph declares float32\[8, 8\]")


# -- tensor messages -----------------------------------------------------------------------


def raw(dtype: str, shape: tuple[int, ...], *, data: bytes | None = None, **fields: Any) -> bytes:
    """A tensor message built field by field, consistent unless a field is overridden."""
    n = 1
    for d in shape:
        n *= max(d, 0)
    if data is None:
        data = bytes(n * (DTYPES[dtype].itemsize if dtype in DTYPES else 4))
    values: dict[str, Any] = {
        "name": "t", "dtype": dtype, "shape": shape, "encoding": "raw",
        "nbytes": len(data), "data": data,
    }  # fmt: skip
    values.update(fields)
    return tensor_pb2.Tensor(**values).SerializeToString()


@pytest.mark.parametrize(
    ("message", "pattern"),
    [
        (raw("float32", (2, 3), nbytes=20), r"needs 24 bytes; header says 20, data has 24"),
        (raw("float32", (2, 3), nbytes=0), r"header says 0, data has 24"),
        (raw("float32", (2, 3), data=bytes(23), nbytes=24), r"header says 24, data has 23"),
        (raw("float32", (2, 3), data=bytes(48), nbytes=48), r"needs 24 bytes"),
        (raw("int64", (3,), data=bytes(12)), r"int64\[3\] needs 24 bytes"),
        (raw("complex64", (2,)), r"unknown dtype 'complex64'"),
        (raw("", (2,)), r"unknown dtype ''"),
        (raw("float32", (2,), encoding="topk"), r"unknown encoding 'topk'"),
        (raw("float32", (2,), encoding=""), r"unknown encoding ''"),
        (raw("float32", (2, -1, 3), data=b"", nbytes=0), r"invalid shape \[2, -1, 3\]"),
        (raw("float32", (-2, -3), data=bytes(24), nbytes=24), r"invalid shape \[-2, -3\]"),
        (raw("float32", (1,) * 17), r"invalid shape \[1, 1, 1"),
        (raw("float32", (0, 1 << 62, 1 << 62), data=b"", nbytes=0), r"invalid shape"),
        (raw("bool", (3,), data=b"\x01\x02\x00"), r"bytes other than 0 and 1"),
        (b"\xff\xff\xff", r"tensor message is corrupt"),
    ],
    ids=[
        "nbytes-short",
        "nbytes-zero",
        "data-short",
        "data-long",
        "data-wrong-for-dtype",
        "unknown-dtype",
        "empty-dtype",
        "unknown-encoding",
        "empty-encoding",
        "negative-dim",
        "negative-dims-product-positive",
        "17-dims",
        "empty-with-overflowing-dims",
        "bool-byte-2",
        "not-a-message",
    ],
)
def test_inconsistent_tensor_message_is_refused_naming_the_problem(
    message: bytes, pattern: str
) -> None:
    with pytest.raises(CodecError, match=pattern):
        graph_serde.decode_tensor(message)


def test_sixteen_dimensions_are_accepted() -> None:
    name, t = graph_serde.decode_tensor(raw("int8", (1,) * 15 + (2,)))
    assert name == "t" and t.shape == (1,) * 15 + (2,)


def _sample(dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64) * 1e3
        t = t.to(dtype)
        flat = t.view(-1)
        if flat.numel() >= 4:  # values a lossy path would mangle
            flat[:4] = torch.tensor([float("inf"), float("-inf"), -0.0, float("nan")])
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    if t.numel() >= 2:
        t.view(-1)[:2] = torch.tensor([info.min, info.max])
    return t


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_every_supported_dtype_round_trips_exactly(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(7)
    for shape in [(3, 5), (), (0,), (2, 0, 3), (1, 1, 1, 4)]:
        t = _sample(dtype, shape, g)
        for source in (t, t.t() if t.dim() == 2 else t):  # non-contiguous input too
            data = graph_serde.encode_tensor("w", source)
            name, back = graph_serde.decode_tensor(data)
            assert name == "w"
            assert back.dtype == dtype and back.shape == source.shape
            # Byte equality, so NaN payloads and -0.0 count.
            assert graph_serde.tensor_bytes(back) == graph_serde.tensor_bytes(source)
            assert back.is_contiguous()
            assert graph_serde.encode_tensor("w", back) == data


def test_decoded_tensor_is_writable_and_does_not_share_the_message_bytes() -> None:
    data = graph_serde.encode_tensor("w", torch.arange(6, dtype=torch.float32))
    _, a = graph_serde.decode_tensor(data)
    _, b = graph_serde.decode_tensor(data)
    a.add_(1)
    assert torch.equal(b, torch.arange(6, dtype=torch.float32))
    assert graph_serde.decode_tensor(data)[1][0].item() == 0.0


# -- malicious graphs ----------------------------------------------------------------------


def node_edit(node: str, /, **changes: Any) -> Callable[[Graph], Graph]:
    def edit(g: Graph) -> Graph:
        nodes = tuple(dataclasses.replace(n, **changes) if n.name == node else n for n in g.nodes)
        return g.with_nodes(nodes)

    return edit


def graph_edit(**changes: Any) -> Callable[[Graph], Graph]:
    return lambda g: dataclasses.replace(g, **changes)


def nested(depth: int) -> Any:
    arg: Any = 1.0
    for _ in range(depth):
        arg = (arg,)
    return arg


def rename_relu_to_linear(g: Graph) -> Graph:
    nodes = []
    for n in g.nodes:
        if n.name == "relu":
            n = dataclasses.replace(n, name="linear")
        elif n.name == "dropout":
            n = dataclasses.replace(n, args=(NodeRef("linear"), 0.1, True))
        nodes.append(n)
    return g.with_nodes(tuple(nodes))


# Each: an edit of the captured `Victim` graph, and what the refusal must name.
MALICIOUS: dict[str, tuple[Callable[[Graph], Graph], str]] = {
    "function-os.system": (node_edit("add", target="os.system"), r"'add'.*'os.system'"),
    "function-builtins.eval": (
        node_edit("add", target="builtins.eval", args=("__import__('os')",)),
        r"'add'.*'builtins.eval'",
    ),
    "function-builtins.exec": (node_edit("add", target="builtins.exec"), r"'builtins.exec'"),
    "function-torch.load": (node_edit("add", target="torch.load"), r"'add'.*'torch.load'"),
    "function-empty": (node_edit("add", target=""), r"'add'.*operator '' is not"),
    "aten-save": (node_edit("add", target="aten.save.default"), r"'add'.*'aten.save.default'"),
    "aten-in-place": (node_edit("relu", target="aten.relu_.default"), r"'relu'.*relu_"),
    "aten-out-variant": (
        node_edit("linear", target="aten.linear.out", kwargs=(("out", NodeRef("x")),)),
        r"'linear'.*writes into its arguments",
    ),
    "aten-copy_": (
        node_edit("add", target="aten.copy_.default", args=(NodeRef("x"), NodeRef("to"))),
        r"'add'.*copy_",
    ),
    "aten-unknown-overload": (node_edit("add", target="aten.add.secret"), r"no overload"),
    "aten-buffer-update-on-an-activation": (
        node_edit("add", target="aten.add_.Tensor", args=(NodeRef("to"), 1.0)),
        r"'add'.*may only update a buffer",
    ),
    "python-operator-on-strings": (
        node_edit("getitem", target="operator.add", args=("a", "b")),
        r"'getitem'.*works on sizes",
    ),
    "python-setitem": (node_edit("getitem", target="operator.setitem"), r"'operator.setitem'"),
    "lstm": (node_edit("linear", target="aten.lstm.input"), r"'linear'.*aten.lstm.input"),
    "linear-missing-weight": (
        node_edit("linear", args=(NodeRef("x"),)),
        r"'linear'.*needs weight",
    ),
    "linear-extra-argument": (
        node_edit("linear", kwargs=(("device", "cuda:3"),)),
        r"'linear'.*takes no argument device=",
    ),
    "dropout-p=2.0": (
        node_edit("dropout", args=(NodeRef("relu"), 2.0, True)),
        r"'dropout'.*p=2.0 must be in \[0, 1\]",
    ),
    "dropout-train-not-bool": (
        node_edit("dropout", args=(NodeRef("relu"), 0.1, "yes")),
        r"'dropout'.*train='yes' must be bool",
    ),
    "to-cuda:3": (
        node_edit("to", target="aten.to.device", args=(NodeRef("mul"), "cuda:3", torch.float32)),
        r"'to'.*'cuda:3'",
    ),
    "to-device=cuda:3": (
        node_edit(
            "to",
            target="aten._to_copy.default",
            args=(NodeRef("mul"),),
            kwargs=(("device", "cuda:3"),),
        ),
        r"'to'.*'cuda:3'",
    ),
    "to-dtype-by-name": (
        node_edit("to", args=(NodeRef("mul"), "float32")),
        r"'to'.*dtype='float32' must be scalartype",
    ),
    "factory-device=cuda:3": (
        node_edit(
            "add",
            target="aten.zeros.default",
            args=(ListArg((2, 8)),),
            kwargs=(("device", "cuda:3"),),
        ),
        r"'add'.*device='cuda:3'",
    ),
    "factory-too-large": (
        node_edit("add", target="aten.zeros.default", args=(ListArg((1 << 30, 1 << 30)),)),
        r"'add'.*too large",
    ),
    "tensor-where-a-size-goes": (
        node_edit("reshape", args=(NodeRef("add"), ListArg((NodeRef("sym_size_int_3"), "x")))),
        r"'reshape'.*must be symint",
    ),
    "ref-to-later-node": (
        node_edit("linear", args=(NodeRef("reshape"), NodeRef("p_fc_weight"))),
        r"'linear'.*%reshape refers to a later node",
    ),
    "ref-to-itself": (
        node_edit("linear", args=(NodeRef("linear"), NodeRef("p_fc_weight"))),
        r"'linear'.*%linear refers to a later",
    ),
    "ref-to-missing-node": (
        node_edit("mul", args=(NodeRef("dropout"), NodeRef("nowhere"))),
        r"'mul'.*%nowhere refers to no node",
    ),
    "ref-hidden-in-nested-kwarg": (
        node_edit("add", kwargs=(("alpha", ((NodeRef("nowhere"),),)),)),
        r"'add'.*%nowhere refers to no node",
    ),
    "duplicate-node-name": (rename_relu_to_linear, r"'linear'.*used by an earlier node"),
    "node-name-not-identifier": (
        node_edit("linear", name="a.b"),
        r"'a.b'.*not a valid identifier",
    ),
    "unknown-node-kind": (node_edit("add", op="exec"), r"'add'.*unknown node kind 'exec'"),
    "param-not-declared": (
        node_edit("p_scale", target="secret"),
        r"'p_scale'.*parameter 'secret'.*not declared",
    ),
    "state-key-of-no-parameter": (
        graph_edit(state_keys=(("scale", "secret"),)),
        r"state key 'scale' names parameter 'secret'",
    ),
    "state-key-twice": (
        graph_edit(state_keys=(("scale", "scale"), ("scale", "scale"))),
        r"a state key is listed twice",
    ),
    "input-with-arguments": (node_edit("x", args=(1,)), r"'x'.*takes no arguments"),
    "output-not-a-node": (graph_edit(outputs=("nowhere",)), r"output 'nowhere' is not a node"),
    "loss-not-an-output": (graph_edit(loss="linear"), r"loss 'linear' is not among its outputs"),
    "inputs-mismatch": (graph_edit(inputs=("x",)), r"declared inputs \['x'\] differ"),
    "other-ir-version": (graph_edit(ir_version=1), r"IR version 1"),
}


@pytest.fixture(scope="module")
def victim_pb_bytes(victim: CapturedModel) -> bytes:
    return graph_serde.encode_graph(victim.graph)


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_malicious_graph_is_refused_at_decode_naming_the_node(
    victim: CapturedModel, case: str
) -> None:
    edit, pattern = MALICIOUS[case]
    bad = edit(victim.graph)
    assert bad != victim.graph
    # The bytes an attacker would send: the codec's encoder checks nothing.
    payload = graph_serde.encode_graph(bad)
    with pytest.raises(CodecError, match=pattern):
        graph_serde.decode_graph(payload)
    # Inside a file with valid checksums, the same graph is refused the same way.
    records = [record(b"G", payload)]
    records += [record(b"T", graph_serde.encode_tensor(k, v)) for k, v in victim.state.items()]
    with pytest.raises(CodecError, match=pattern):
        model_file.decode_model(opdag_file(*records, record(b"E", b"")))


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_stage_module_refuses_the_malicious_graph_object(victim: CapturedModel, case: str) -> None:
    edit, pattern = MALICIOUS[case]
    with pytest.raises(IRError, match=pattern):
        StageModule(edit(victim.graph), victim.state)


def test_the_unedited_victim_graph_decodes_and_runs(victim: CapturedModel) -> None:
    # The control for the cases above: only their edit makes them fail.
    graph = graph_serde.decode_graph(graph_serde.encode_graph(victim.graph))
    model = Victim()
    model.load_state_dict(victim.state)
    model.eval()
    stage = StageModule(graph, victim.state).eval()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(stage({"x": x, "y": y})["mse_loss"], model(x, y))


def _collision_graphs() -> dict[str, Graph]:
    x = Node("x", "input", "x")

    def reads(*names: str) -> tuple[Node, ...]:
        return tuple(Node(f"p{i}", "param", name) for i, name in enumerate(names))

    return {
        # A parameter 'graph' would shadow the stage module's own attribute.
        "parameter-named-like-an-attribute": Graph(
            name="g",
            nodes=(
                x,
                *reads("graph"),
                Node("o", "function", "aten.mul.Tensor", (NodeRef("x"), NodeRef("p0"))),
            ),
            inputs=("x",),
            outputs=("o",),
            params=(ParamSpec("graph", (2,), "float32", True),),
        ),
        # A parameter nested under another parameter: 'fc.weight.z'.
        "parameter-under-a-parameter": Graph(
            name="g",
            nodes=(
                x,
                *reads("fc.weight", "fc.weight.z"),
                Node("h", "function", "aten.mul.Tensor", (NodeRef("x"), NodeRef("p0"))),
                Node("o", "function", "aten.mul.Tensor", (NodeRef("h"), NodeRef("p1"))),
            ),
            inputs=("x",),
            outputs=("o",),
            params=(
                ParamSpec("fc.weight", (2,), "float32", True),
                ParamSpec("fc.weight.z", (2,), "float32", True),
            ),
        ),
    }


@pytest.mark.parametrize("case", list(_collision_graphs()))
def test_stage_module_refuses_a_decoded_graph_whose_names_collide(case: str) -> None:
    graph = graph_serde.decode_graph(graph_serde.encode_graph(_collision_graphs()[case]))
    with pytest.raises(IRError):
        StageModule(graph, device="meta")


def _edited_pb(victim_pb_bytes: bytes, edit: Callable[[opdag_pb2.Graph], None]) -> bytes:
    pb = opdag_pb2.Graph.FromString(victim_pb_bytes)
    edit(pb)
    return pb.SerializeToString()


def _node_pb(pb: opdag_pb2.Graph, name: str) -> opdag_pb2.Node:
    return next(n for n in pb.nodes if n.name == name)


def test_argument_nesting_deeper_than_32_is_refused_naming_the_node(
    victim_pb_bytes: bytes,
) -> None:
    def nest(depth: int) -> Callable[[opdag_pb2.Graph], None]:
        def edit(pb: opdag_pb2.Graph) -> None:
            arg = _node_pb(pb, "add").args[1]
            for _ in range(depth):
                arg = arg.tuple_value.items.add()
            arg.float_value = 1.0

        return edit

    # 32 levels decode; then the operator refuses a tuple where its tensor goes.
    with pytest.raises(CodecError, match=r"node 'add'.*must be tensor"):
        graph_serde.decode_graph(_edited_pb(victim_pb_bytes, nest(32)))
    pb = opdag_pb2.Graph.FromString(_edited_pb(victim_pb_bytes, nest(32)))
    assert graph_serde._arg_from_pb(_node_pb(pb, "add").args[1]) == nested(32)
    with pytest.raises(CodecError, match=r"node 'add'.*deeper than 32"):
        graph_serde.decode_graph(_edited_pb(victim_pb_bytes, nest(33)))
    # Past protobuf's own recursion limit the message itself is refused as corrupt.
    with pytest.raises(CodecError):
        graph_serde.decode_graph(_edited_pb(victim_pb_bytes, nest(200)))


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda pb: _node_pb(pb, "add").args.add(), r"node 'add'.*argument has no value"),
        (
            lambda pb: setattr(_node_pb(pb, "to").args[1], "dtype", "complex64"),
            r"node 'to'.*unknown dtype 'complex64'",
        ),
        (
            lambda pb: _node_pb(pb, "add").args[1].slice_value.start.SetInParent(),
            r"node 'add'.*argument has no value",
        ),
        (
            lambda pb: setattr(_node_pb(pb, "add").meta, "kind", "pickle"),
            r"node 'add'.*unknown value kind 'pickle'",
        ),
        (
            lambda pb: setattr(_node_pb(pb, "add").meta, "dtype", "object"),
            r"node 'add'.*unknown dtype 'object'",
        ),
        (
            lambda pb: _node_pb(pb, "add").meta.shape.append(-5),
            r"node 'add'.*negative dimension",
        ),
        (lambda pb: pb.params[0].shape.append(-1), r"negative dimension"),
        (lambda pb: setattr(pb.params[0], "dtype", "object"), r"unknown dtype 'object'"),
        (lambda pb: pb.params.add().CopyFrom(pb.params[0]), r"lists a parameter twice"),
    ],
    ids=[
        "empty-arg",
        "unknown-dtype-arg",
        "slice-without-value",
        "meta-unknown-kind",
        "meta-unknown-dtype",
        "meta-negative-dim",
        "param-negative-dim",
        "param-unknown-dtype",
        "param-twice",
    ],
)
def test_malformed_graph_message_is_refused_naming_where(
    victim_pb_bytes: bytes, edit: Callable[[opdag_pb2.Graph], None], pattern: str
) -> None:
    with pytest.raises(CodecError, match=pattern):
        graph_serde.decode_graph(_edited_pb(victim_pb_bytes, edit))


def test_local_device_and_every_argument_kind_round_trip() -> None:
    args = (
        NodeRef("x"),
        None,
        True,
        -(1 << 63),
        (1 << 63) - 1,
        2.5,
        float("inf"),
        "s",
        (1, (2, 3)),
        ListArg((1, NodeRef("x"))),
        SliceArg(None, 4, -1),
        Ellipsis,
        torch.bfloat16,
        LOCAL_DEVICE,
        (),
    )
    for arg in args:
        pb = opdag_pb2.Arg()
        graph_serde._arg_to_pb(arg, pb)
        assert graph_serde._arg_from_pb(opdag_pb2.Arg.FromString(pb.SerializeToString())) == arg
    # And inside a graph, which is validated as it is decoded.
    g = Graph(
        name="args",
        nodes=(
            Node("x", "input", "x", meta=ValueMeta("tensor", (2,), "float32")),
            Node(
                "y",
                "function",
                "aten.full.default",
                args=(ListArg((2, -(1 << 0) + 3)), float("inf")),
                kwargs=(("dtype", torch.bfloat16), ("device", LOCAL_DEVICE)),
            ),
        ),
        inputs=("x",),
        outputs=("y",),
    )
    back = graph_serde.decode_graph(graph_serde.encode_graph(g))
    assert back == g
    assert isinstance(dict(back.node("y").kwargs)["device"], LocalDevice)
    with pytest.raises(CodecError, match="does not fit in 64 bits"):
        graph_serde.encode_graph(
            g.with_nodes((g.nodes[0], dataclasses.replace(g.nodes[1], args=(ListArg((1 << 63,)),))))
        )


# -- fuzz ----------------------------------------------------------------------------------


def _mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.choice(("overwrite", "insert", "delete"))
        pos = rng.randrange(len(out) + 1)
        if what == "overwrite" and pos < len(out):
            out[pos] = rng.randrange(256)
        elif what == "insert":
            out[pos:pos] = rng.randbytes(rng.randint(1, 8))
        else:
            del out[pos : pos + rng.randint(1, 8)]
    return bytes(out)


_TARGETS = (
    "aten.add.Tensor",
    "aten.relu.default",
    "aten.relu_.default",
    "aten.linear.out",
    "aten.zeros.default",
    "aten.add_.Tensor",
    "torch.add",
    "operator.getitem",
    "reshape",
    "to",
    "add_",
    "os.system",
    "",
    "fc",
    "x",
    "Linear",
    "LSTM",
    "\x00",
    "__class__",
)


def _mutate_graph_message(payload: bytes, rng: random.Random) -> bytes:
    """A graph message still well framed, with one field of one node, param or the graph
    changed, so the mutation reaches the semantic checks rather than the parser."""
    pb = opdag_pb2.Graph.FromString(payload)
    node = pb.nodes[rng.randrange(len(pb.nodes))]
    what = rng.randrange(9)
    if what == 0:
        node.name = rng.choice([n.name for n in pb.nodes] + ["", "a.b", "new"])
    elif what == 1:
        node.op = rng.choice(("input", "param", "module", "function", "method", "call"))
    elif what == 2:
        node.target = rng.choice(_TARGETS + tuple(n.name for n in pb.nodes))
    elif what == 3 and node.args:
        arg = node.args[rng.randrange(len(node.args))]
        choice = rng.randrange(5)
        if choice == 0:
            arg.node = rng.choice([n.name for n in pb.nodes] + ["nowhere"])
        elif choice == 1:
            arg.int_value = rng.randint(-(1 << 63), (1 << 63) - 1)
        elif choice == 2:
            arg.str_value = rng.choice(_TARGETS)
        elif choice == 3:
            arg.dtype = rng.choice((*DTYPES, "object"))
        else:
            arg.Clear()
    elif what == 4 and node.kwargs:
        kwarg = node.kwargs[rng.randrange(len(node.kwargs))]
        if rng.random() < 0.5:
            kwarg.name = rng.choice(("out", "device", "inplace", "p", ""))
        else:
            kwarg.value.int_value = rng.randint(-3, 1 << 33)
    elif what == 5:
        node.meta.kind = rng.choice(("tensor", "tuple", "int", "pickle", ""))
        node.meta.shape.append(rng.randint(-2, 3))
    elif what == 6:
        del pb.nodes[rng.randrange(len(pb.nodes))]
    elif what == 7 and pb.params:
        param = pb.params[rng.randrange(len(pb.params))]
        param.name = rng.choice(("fc.weight", "scale", "", "nope", "fc.bias"))
    else:
        pb.outputs.append(rng.choice([n.name for n in pb.nodes] + ["nowhere"]))
        pb.loss = rng.choice((pb.loss, "", "fc"))
    return pb.SerializeToString()


def _fuzz_inputs(victim_file: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    records = split_records(victim_file)
    graph_payload = records[0][1]
    tensor_payloads = [p for k, p in records if k == b"T"]
    header = HEADER.pack(MAGIC, 1)
    out = []
    for i in range(count):
        style = i % 6
        if style == 0:  # pure noise
            out.append(rng.randbytes(rng.randint(0, 300)))
        elif style == 1:  # a valid header, then noise
            out.append(header + rng.randbytes(rng.randint(0, 300)))
        elif style == 2:  # a mutated valid file (checksums now mostly wrong)
            out.append(_mutate(victim_file, rng))
        elif style == 3:  # a mutated graph message, in a record with a *valid* checksum
            if rng.random() < 0.5:
                g = _mutate(graph_payload, rng)
            else:
                g = _mutate_graph_message(graph_payload, rng)
            tensors = [record(b"T", p) for p in tensor_payloads]
            out.append(header + record(b"G", g) + b"".join(tensors) + record(b"E", b""))
        elif style == 4:  # a mutated tensor message in a valid record
            t = [record(b"T", p) for p in tensor_payloads]
            j = rng.randrange(len(t))
            t[j] = record(b"T", _mutate(tensor_payloads[j], rng))
            out.append(header + record(b"G", graph_payload) + b"".join(t) + record(b"E", b""))
        else:  # random records with valid checksums, or the untouched file now and then
            if rng.random() < 0.2:
                out.append(victim_file)
                continue
            recs = [
                record(
                    rng.choice(b"GTEX\x00").to_bytes(1, "little"), rng.randbytes(rng.randint(0, 40))
                )
                for _ in range(rng.randint(0, 4))
            ]
            out.append(header + b"".join(recs))
    return out


def test_fuzzed_bytes_give_success_or_codec_error_and_nothing_else(victim_file: bytes) -> None:
    records = split_records(victim_file)
    inputs = _fuzz_inputs(victim_file, 1000, seed=20240601)
    # The raw messages too, mutated, straight into the message decoders.
    rng = random.Random(5)
    messages = [_mutate(p, rng) for _, p in records[:-1] for _ in range(40)]
    messages += [_mutate_graph_message(records[0][1], rng) for _ in range(200)]
    messages += [p for _, p in records[:-1]]
    decoders: dict[str, Callable[[bytes], Any]] = {
        "decode_model": model_file.decode_model,
        "decode_graph": graph_serde.decode_graph,
        "decode_tensor": graph_serde.decode_tensor,
    }
    outcomes = {name: {"ok": 0, "refused": 0} for name in decoders}
    slowest = 0.0
    for data in inputs + messages:
        for name, decode in decoders.items():
            start = time.perf_counter()
            try:
                decode(data)
            except CodecError:
                outcomes[name]["refused"] += 1
            except Exception as e:  # pragma: no cover - the failure this test looks for
                pytest.fail(f"{name} raised {type(e).__name__}: {e} on {data[:64]!r}...")
            else:
                outcomes[name]["ok"] += 1
            slowest = max(slowest, time.perf_counter() - start)
    # Both outcomes happen for every decoder, so the fuzz reaches past the first check.
    for name, seen in outcomes.items():
        assert seen["ok"] > 0 and seen["refused"] > 0, (name, seen)
    assert slowest < 2.0, f"one decode took {slowest:.1f} s"
