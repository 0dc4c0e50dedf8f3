"""The operator allow-list: a table of ATen operators. Every allow-listed layer captures to
ATen operators that compute exactly what the layer does; in-place writes into inputs,
parameters and views, named devices, unlisted operators and arguments of the wrong kind are
refused; capture says which operator and where."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opdag import graph_serde, ops
from opdag.capture import capture
from opdag.errors import CaptureError, IRError
from opdag.ir import LOCAL_DEVICE, ListArg, LocalDevice, Node, NodeRef
from opdag.stage import StageModule

pytestmark = pytest.mark.unit


# -- layers ------------------------------------------------------------------------------------


def _ints(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randint(0, 11, shape, generator=g)


def _floats(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(shape, generator=g)


# A representative of each allow-listed type, built with non-default arguments wherever the
# type has any, and an input for it. Several types have more than one representative.
REPRESENTATIVES: list[tuple[str, Callable[[], nn.Module], Callable[[torch.Generator], Any]]] = [
    ("Linear", lambda: nn.Linear(6, 5, bias=False), _floats(3, 6)),
    ("Linear-bias", lambda: nn.Linear(6, 1), _floats(2, 4, 6)),
    (
        "Embedding",
        lambda: nn.Embedding(11, 4, padding_idx=2, scale_grad_by_freq=True),
        _ints(2, 5),
    ),
    ("Embedding-negative-padding", lambda: nn.Embedding(11, 3, padding_idx=-1), _ints(4)),
    (
        "LayerNorm",
        lambda: nn.LayerNorm((4, 6), eps=1e-3, elementwise_affine=True, bias=False),
        _floats(2, 4, 6),
    ),
    ("LayerNorm-no-affine", lambda: nn.LayerNorm(6, elementwise_affine=False), _floats(3, 6)),
    ("RMSNorm", lambda: nn.RMSNorm([6], eps=1e-4), _floats(3, 6)),
    ("RMSNorm-no-eps", lambda: nn.RMSNorm((2, 6), elementwise_affine=False), _floats(3, 2, 6)),
    ("GroupNorm", lambda: nn.GroupNorm(2, 6, eps=1e-3, affine=False), _floats(2, 6, 3, 3)),
    (
        "Conv1d",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
        _floats(2, 4, 9),
    ),
    (
        "Conv1d-same",
        lambda: nn.Conv1d(4, 2, 4, padding="same", dilation=2, bias=False),
        _floats(2, 4, 9),
    ),
    (
        "Conv2d",
        lambda: nn.Conv2d(
            4,
            6,
            (3, 2),
            stride=(2, 1),
            padding=(1, 0),
            dilation=(1, 2),
            groups=2,
            bias=False,
            padding_mode="replicate",
        ),
        _floats(2, 4, 7, 7),
    ),
    (
        "Conv2d-valid-circular",
        lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
        _floats(1, 3, 5, 5),
    ),
    (
        "BatchNorm1d",
        lambda: nn.BatchNorm1d(5, eps=1e-3, momentum=0.3, affine=True),
        _floats(4, 5),
    ),
    (
        "BatchNorm1d-no-running-stats",
        lambda: nn.BatchNorm1d(5, affine=False, track_running_stats=False),
        _floats(4, 5, 3),
    ),
    ("BatchNorm2d", lambda: nn.BatchNorm2d(3, momentum=0.2), _floats(2, 3, 4, 4)),
    ("ReLU", lambda: nn.ReLU(inplace=True), _floats(3, 4)),
    ("SiLU", lambda: nn.SiLU(inplace=True), _floats(3, 4)),
    ("LeakyReLU", lambda: nn.LeakyReLU(0.2, inplace=True), _floats(3, 4)),
    ("GELU", lambda: nn.GELU(approximate="tanh"), _floats(3, 4)),
    ("Tanh", lambda: nn.Tanh(), _floats(3, 4)),
    ("Sigmoid", lambda: nn.Sigmoid(), _floats(3, 4)),
    ("Identity", lambda: nn.Identity(), _floats(3, 4)),
    ("Softmax", lambda: nn.Softmax(dim=1), _floats(2, 3, 4)),
    ("LogSoftmax", lambda: nn.LogSoftmax(dim=-2), _floats(2, 3, 4)),
    ("Dropout", lambda: nn.Dropout(p=0.3, inplace=True), _floats(6, 7)),
    ("Flatten", lambda: nn.Flatten(start_dim=0, end_dim=-2), _floats(2, 3, 4, 5)),
    (
        "MaxPool2d",
        lambda: nn.MaxPool2d((3, 2), stride=2, padding=1, dilation=(1, 2), ceil_mode=True),
        _floats(2, 3, 7, 8),
    ),
    (
        "AvgPool2d",
        lambda: nn.AvgPool2d(
            3,
            stride=(2, 1),
            padding=1,
            ceil_mode=True,
            count_include_pad=False,
            divisor_override=2,
        ),
        _floats(2, 3, 7, 6),
    ),
    ("AdaptiveAvgPool2d", lambda: nn.AdaptiveAvgPool2d((3, 2)), _floats(2, 3, 7, 5)),
    ("AdaptiveAvgPool2d-int", lambda: nn.AdaptiveAvgPool2d(1), _floats(2, 3, 4, 4)),
]


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    """Non-default values in every parameter and buffer, so a lost one shows."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dtype == torch.int64:
                t.fill_(3)


class _Fresh(nn.Module):
    """One layer applied to a value the graph made (`x * 1`), as inside any real model."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * 1 if x.is_floating_point() else x)


@pytest.mark.parametrize(
    ("case", "make", "make_input"), REPRESENTATIVES, ids=[r[0] for r in REPRESENTATIVES]
)
def test_layer_captures_to_aten_operators_with_identical_output_and_gradients(
    case: str, make: Callable[[], nn.Module], make_input: Callable[[torch.Generator], Any]
) -> None:
    g = torch.Generator().manual_seed(0)
    original = _Fresh(make())
    _randomize(original, g)
    x = make_input(g)
    captured = capture(original, {"x": x})
    # Plain data that survives the wire, and only ATen operators.
    graph = graph_serde.decode_graph(graph_serde.encode_graph(captured.graph))
    assert graph == captured.graph
    assert all(n.target.startswith("aten.") for n in graph.compute_nodes)
    stage = StageModule(graph, captured.state)
    assert sorted(stage.state_dict()) == sorted(original.state_dict())
    for mode in ("train", "eval"):
        original.train(mode == "train")
        stage.train(mode == "train")
        x = make_input(g)
        if x.is_floating_point():
            x.requires_grad_(True)
        torch.manual_seed(1)
        expected = original(x)
        torch.manual_seed(1)
        (got,) = stage({"x": x}).values()
        assert got.shape == expected.shape, mode
        assert torch.equal(got, expected), mode
        if expected.requires_grad:
            leaves = [x] if x.requires_grad else []
            grads = torch.autograd.grad(expected.sum(), [*leaves, *original.parameters()])
            ours = torch.autograd.grad(got.sum(), [*leaves, *stage.parameters()])
            for a, b in zip(grads, ours, strict=True):
                assert torch.equal(a, b), mode
    # Running statistics were updated the same way (and not at all in eval mode).
    theirs, ours = original.state_dict(), stage.state_dict()
    for name, a in theirs.items():
        assert torch.equal(a, ours[name]), name


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ReLU(inplace=True),
        lambda: nn.SiLU(inplace=True),
        lambda: nn.LeakyReLU(0.1, inplace=True),
        lambda: nn.Dropout(0.5, inplace=True),
    ],
    ids=["ReLU", "SiLU", "LeakyReLU", "Dropout"],
)
def test_in_place_layers_capture_out_of_place(make: Callable[[], nn.Module]) -> None:
    model = _Fresh(make())
    captured = capture(model, {"x": torch.zeros(8, 8)})
    targets = [n.target for n in captured.graph.compute_nodes]
    assert not any(t.split(".")[1].endswith("_") for t in targets), targets
    x = torch.randn(8, 8)
    before = x.clone()
    torch.manual_seed(2)
    (out,) = StageModule(captured.graph, captured.state)({"x": x}).values()
    assert torch.equal(x, before), "the stage wrote into its input"
    torch.manual_seed(2)
    assert torch.equal(out, model(before.clone()))


def test_the_table_names_real_operators_and_allows_no_writing_overload() -> None:
    for packet in ops._ATEN:
        overloads = getattr(torch.ops.aten, packet).overloads()
        allowed = [o for o in overloads if ops.is_allowed(f"aten.{packet}.{o}")]
        assert allowed, packet
        for o in allowed:
            schema = ops.overload(f"aten.{packet}.{o}")._schema
            assert not schema.is_mutable, (packet, o)
            assert o != "out" and not o.endswith("_out"), (packet, o)
    for name in ("aten.add_.Tensor", "aten.relu_.default", "aten.linear.out", "aten.copy_.default"):
        assert name in ops.BUFFER_UPDATES or not ops.is_allowed(name), name


# -- nodes -------------------------------------------------------------------------------------


def _fn(target: str, *args: Any, **kwargs: Any) -> Node:
    return Node("n", "function", target, tuple(args), tuple(kwargs.items()))


def _case(node: Node, pattern: str) -> Any:
    return pytest.param(node, pattern, id=node.describe().removeprefix("n = "))


X, Y = NodeRef("x"), NodeRef("y")


@pytest.mark.parametrize(
    "node",
    [
        _fn("aten.linear.default", X, Y),
        _fn("aten.linear.default", X, Y, None),
        _fn("aten.mul.Tensor", X, 0.5),
        _fn("aten.view.default", X, ListArg((NodeRef("b"), -1))),
        _fn("aten.to.dtype", X, torch.float16),
        _fn("aten.to.dtype_layout", X, dtype=torch.bfloat16, layout="strided", device=LOCAL_DEVICE),
        _fn("aten.zeros.default", ListArg((2, 2)), device=LOCAL_DEVICE),
        _fn("aten.arange.start", 0, NodeRef("t"), device=LOCAL_DEVICE),
        _fn("aten.contiguous.default", X, memory_format="contiguous_format"),
        _fn("aten.dropout.default", X, 0.1, True),
        _fn("aten.cat.default", ListArg((X, Y)), 1),
        _fn("aten.einsum.default", "nd,ed->ne", ListArg((X, Y))),
        _fn("aten.sym_size.int", X, 0),
        _fn("operator.mul", NodeRef("b"), 4),
        _fn("operator.getitem", NodeRef("chunks"), 1),
    ],
    ids=lambda n: n.describe().removeprefix("n = "),
)
def test_allowed_node_passes_the_check(node: Node) -> None:
    ops.check_node(node)


@pytest.mark.parametrize(
    ("node", "pattern"),
    [
        _case(_fn("os.system", "true"), r"'os.system' is not in the allow-list"),
        _case(_fn("builtins.eval", "1"), r"'builtins.eval'"),
        _case(_fn("torch.load", "f"), r"'torch.load'"),
        _case(_fn("aten.save.default", X, "f"), r"'aten.save.default' is not in the allow-list"),
        _case(_fn("aten.lstm.input", X), r"aten.lstm.input"),
        _case(_fn("aten.relu_.default", X), r"'aten.relu_.default' is not in the allow-list"),
        _case(_fn("aten.copy_.default", X, Y), r"copy_"),
        _case(_fn("aten.linear.out", X, Y, None, out=Y), r"writes into its arguments"),
        _case(_fn("aten.linear.nope", X, Y), r"no overload 'nope'"),
        _case(_fn("aten.split.str", "a,b", ","), r"works on strings"),
        _case(_fn("aten.linear", X, Y), r"not in the allow-list"),
        _case(_fn("aten.linear.default", X), r"needs weight"),
        _case(_fn("aten.linear.default", X, Y, None, 1), r"takes 3 positional arguments"),
        _case(_fn("aten.linear.default", X, Y, bogus=1), r"takes no argument bogus="),
        _case(_fn("aten.linear.default", X, Y, input=X), r"takes no argument input="),
        _case(_fn("aten.dropout.default", X, 1.5, True), r"p=1.5 must be in \[0, 1\]"),
        _case(_fn("aten.dropout.default", X, "0.5", True), r"p='0.5' must be float"),
        _case(_fn("aten.to.dtype", X, "float16"), r"dtype='float16' must be scalartype"),
        _case(_fn("aten.zeros.default", ListArg((2,)), device="cuda:3"), r"device='cuda:3'"),
        _case(_fn("aten.ones_like.default", X, device="cpu"), r"device='cpu'"),
        _case(_fn("aten.to.dtype_layout", X, layout="sparse_coo"), r"layout='sparse_coo'"),
        _case(_fn("aten.clone.default", X, memory_format="weird"), r"memory_format='weird'"),
        _case(_fn("aten.embedding.default", Y, X, -1, False, True), r"sparse gradients"),
        _case(_fn("aten.zeros.default", ListArg((1 << 20, 1 << 20))), r"too large"),
        _case(_fn("aten.view.default", X, (2, "a")), r"must be symint"),
        _case(_fn("operator.mul", X, "a"), r"works on sizes"),
        _case(_fn("operator.setitem", X, 0, 1), r"not in the allow-list"),
        _case(Node("n", "input", "x", (1,)), r"takes no arguments"),
        _case(Node("n", "param", "w", (), (("k", 1),)), r"takes no arguments"),
    ],
)
def test_refused_node_is_an_ir_error_naming_node_and_operator(node: Node, pattern: str) -> None:
    with pytest.raises(IRError, match=r"node 'n'") as info:
        ops.check_node(node)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_an_in_place_update_is_allowed_on_a_buffer_read_by_nothing_else() -> None:
    captured = capture(_Fresh(nn.BatchNorm1d(3)), {"x": torch.zeros(4, 3)})
    ops.validate_graph(captured.graph)
    update = next(n for n in captured.graph.nodes if n.target in ops.BUFFER_UPDATES)
    buffer = update.args[0]
    assert isinstance(buffer, NodeRef)
    # The same update on an activation, or on a buffer another operator reads, is refused.
    nodes = list(captured.graph.nodes)
    mul = next(n for n in nodes if n.target == "aten.mul.Tensor")
    on_activation = [replace(n, args=(NodeRef(mul.name), 1)) if n is update else n for n in nodes]
    second_reader = [*nodes, Node("again", "function", "aten.mul.Tensor", (buffer, 2))]
    for bad in (on_activation, second_reader):
        with pytest.raises(IRError, match=r"may only update a buffer that no other operator"):
            ops.validate_graph(captured.graph.with_nodes(tuple(bad)))


def test_runtime_checks_refuse_python_operators_on_tensors() -> None:
    with pytest.raises(IRError, match=r"operator.mul works on sizes, not tensors"):
        ops.call(_fn("operator.mul", X, 2), [torch.zeros(2), 2], {})
    with pytest.raises(IRError, match=r"getitem reads an operator's tuple of results"):
        ops.call(_fn("operator.getitem", X, 0), [torch.zeros(2), 0], {})
    assert ops.call(_fn("operator.mul", X, 2), [3, 2], {}) == 6


def test_local_device_resolves_to_the_stage_device() -> None:
    device = torch.device("meta")
    env = {"x": torch.zeros(1)}
    assert ops.resolve(LOCAL_DEVICE, env, device) == device
    assert ops.resolve((LOCAL_DEVICE, NodeRef("x")), env, device) == (device, env["x"])


# -- capture -----------------------------------------------------------------------------------


class _FFTBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft(self.fc(x)).real  # the refused line


class UsesFFT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Identity(), _FFTBlock()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.sum()


class UsesBessel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.special.bessel_j0(torch.tanh(self.fc(x)))
        return h.sum() + torch.special.zeta(x, 2.0).sum()


def _line_of(marker: str) -> int:
    """The line number of this file's line containing `marker`."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()  # type: ignore[arg-type]
    return next(i for i, line in enumerate(lines, 1) if marker in line and "_line_of" not in line)


def test_capture_refuses_an_unlisted_operator_naming_it_and_its_module_path() -> None:
    with pytest.raises(CaptureError) as info:
        capture(UsesFFT(), {"x": torch.zeros(2, 4)})
    message = str(info.value)
    assert "operator(s) outside the allow-list" in message
    assert re.search(r"aten\._?fft\w*\.\w+ at blocks\.1\b", message), message

    with pytest.raises(CaptureError) as info:
        capture(UsesBessel(), {"x": torch.zeros(2, 4)})
    message = str(info.value)
    # Each refused operator is listed, at the root module.
    assert "2 operator(s) outside the allow-list" in message
    assert "aten.special_bessel_j0.default at <root>" in message, message
    assert "aten.special_zeta.other_scalar at <root>" in message, message


def test_capture_error_points_at_the_users_file_and_line() -> None:
    with pytest.raises(CaptureError) as info:
        capture(UsesFFT(), {"x": torch.zeros(2, 4)})
    expected = f"test_ops.py:{_line_of('# the refused line')} in forward"
    assert expected in str(info.value)


def test_capture_refuses_lstm_naming_its_operator_and_path() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, batch_first=True))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(x)[0].sum()

    with pytest.raises(CaptureError, match=r"aten\.lstm\.\w+ at enc\.1\b"):
        capture(Encoder(), {"x": torch.zeros(2, 3, 4)})


def test_capture_refuses_writes_into_inputs_parameters_and_views() -> None:
    class IntoInput(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.add_(1).sum()

    class IntoBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.w.mul_(2)
            return (x * self.w).sum()

    class IntoView(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 2
            h[:, 0].add_(1)
            return h.sum()

    with pytest.raises(CaptureError, match=r"aten\.add_\.Tensor writes into an input \(x\)"):
        capture(IntoInput(), {"x": torch.zeros(2, 3)})
    with pytest.raises(CaptureError, match=r"mul_\.Tensor writes into a parameter or buffer"):
        capture(IntoBuffer(), {"x": torch.zeros(2, 3)})
    with pytest.raises(CaptureError, match=r"writes into a view .*aten\.(select|slice)"):
        capture(IntoView(), {"x": torch.zeros(2, 3)})


def test_in_place_arithmetic_on_fresh_values_captures_out_of_place() -> None:
    class Accumulates(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h += x
            h.mul_(0.5)
            return F.relu(h, inplace=True).sum()

    torch.manual_seed(0)
    model = Accumulates()
    captured = capture(model, {"x": torch.zeros(2, 3)})
    assert [n.target for n in captured.graph.compute_nodes] == [
        "aten.linear.default",
        "aten.add.Tensor",
        "aten.mul.Tensor",
        "aten.relu.default",
        "aten.sum.default",
    ]
    x = torch.randn(4, 3)
    (out,) = StageModule(captured.graph, captured.state)({"x": x}).values()
    assert torch.equal(out, model(x))


def test_data_dependent_control_flow_is_a_capture_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"cannot capture Branchy: .*not tensor values") as info:
        capture(Branchy(), {"x": torch.zeros(2, 3)})
    assert type(info.value) is CaptureError
    assert len(str(info.value).splitlines()) == 1


def test_shape_checks_and_masks_from_shapes_specialise_at_capture() -> None:
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.tril(torch.ones(8, 8)))
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            assert t <= 8, "sequence too long"
            h = self.fc(x)
            att = h @ h.transpose(1, 2)
            att = att.masked_fill(self.mask[:t, :t] == 0, float("-inf")).softmax(-1)
            return (att @ h).view(b * t, -1).sum()

    torch.manual_seed(0)
    model = Checked()
    captured = capture(model, {"x": torch.zeros(3, 6, 4, device="meta")})
    assert captured.graph.dynamic_batch
    stage = StageModule(captured.graph, captured.state)
    for batch in (1, 3, 5):  # the batch stays free, the sequence length was fixed at 6
        x = torch.randn(batch, 6, 4)
        (out,) = stage({"x": x}).values()
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)


def test_a_model_that_fixes_its_batch_is_captured_for_that_batch_alone() -> None:
    class FixedBatch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(4, -1).sum(0).sum() if x.shape[0] == 4 else x.sum()

    captured = capture(FixedBatch(), {"x": torch.zeros(4, 3)})
    assert not captured.graph.dynamic_batch
    stage = StageModule(captured.graph, captured.state)
    assert float(stage({"x": torch.ones(4, 3)})[captured.graph.outputs[0]]) == 12.0
    with pytest.raises(IRError, match=r"captured for batches of 4 .*not 5"):
        stage({"x": torch.ones(5, 3)})


class MovesToDevice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.to(torch.device("cpu")))
        bias = torch.ones(h.shape[1], device="cpu")
        return h + bias


def test_device_constants_capture_as_the_local_device_and_run() -> None:
    torch.manual_seed(0)
    model = MovesToDevice()
    captured = capture(model, {"x": torch.zeros(2, 4)})
    graph = graph_serde.decode_graph(graph_serde.encode_graph(captured.graph))
    assert graph == captured.graph
    devices = [v for n in graph.nodes for _, v in n.kwargs if isinstance(v, LocalDevice)]
    assert devices, graph.describe()
    assert not [
        a for n in graph.nodes for a in (*n.args, *(v for _, v in n.kwargs)) if a == "cpu"
    ], "a named device was kept"

    x = torch.randn(5, 4)
    stage = StageModule(graph, captured.state)
    (out,) = stage({"x": x}).values()
    assert torch.equal(out, model(x))
    # On another device the same graph follows the stage, not the device it was captured on.
    meta = StageModule(graph, device="meta")
    (out_meta,) = meta({"x": x.to("meta")}).values()
    assert out_meta.device.type == "meta" and out_meta.shape == (5, 3)


def test_tied_weights_are_one_parameter_under_both_names() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(t)).logsumexp(-1).mean()

    torch.manual_seed(0)
    model = Tied()
    captured = capture(model, {"t": torch.zeros(2, 3, dtype=torch.int64)})
    graph = captured.graph
    assert [p.name for p in graph.params] == ["embed.weight"]
    assert dict(graph.state_keys) == {"embed.weight": "embed.weight", "head.weight": "embed.weight"}
    (read,) = [n for n in graph.nodes if n.op == "param"]
    assert len(graph.consumers[read.name]) == 2  # the embedding and the head read it
    t = torch.randint(0, 10, (2, 3))
    stage = StageModule(graph, captured.state)
    (ours,) = stage({"t": t}).values()
    theirs = model(t)
    assert torch.equal(ours, theirs)
    ours.backward()
    theirs.backward()
    # Both uses' gradients add up in the one parameter, as in PyTorch.
    assert model.embed.weight.grad is not None
    torch.testing.assert_close(stage.tensor("embed.weight").grad, model.embed.weight.grad)


def test_subclass_of_a_torch_layer_is_traced_through() -> None:
    class DoubledLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = DoubledLinear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    torch.manual_seed(0)
    model = Model()
    captured = capture(model, {"x": torch.zeros(2, 4)})
    assert [n.target for n in captured.graph.compute_nodes] == [
        "aten.linear.default",
        "aten.mul.Tensor",
    ]
    x = torch.randn(3, 4)
    (out,) = StageModule(captured.graph, captured.state)({"x": x}).values()
    assert torch.equal(out, model(x))
