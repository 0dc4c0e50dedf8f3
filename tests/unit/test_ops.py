"""The operator allow-list: every listed module rebuilds from its attributes to the same
computation; look-alikes, in-place writes, named devices and unlisted operators are refused;
capture says which operator and where."""

from __future__ import annotations

import builtins
import functools
import inspect
import operator
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from opdag import graph_serde, ops
from opdag.capture import capture
from opdag.errors import CaptureError, IRError
from opdag.ir import LOCAL_DEVICE, Graph, LocalDevice, ModuleSpec, Node, NodeRef
from opdag.stage import StageModule

pytestmark = pytest.mark.unit


# -- module types --------------------------------------------------------------------------


def _bad(spec: ModuleSpec, pattern: str, what: str = "") -> Any:
    """A refused spec, its test id naming the type and what the refusal must mention."""
    what = what or re.sub(r"[^A-Za-z0-9_=.'-]+", "", pattern.split(".*")[-1].split(" must")[0])
    return pytest.param(spec, pattern, id=f"{spec.type}-{what}")


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
    ("BatchNorm2d", lambda: nn.BatchNorm2d(3, momentum=None), _floats(2, 3, 4, 4)),
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


def test_representatives_cover_every_allow_listed_module_type() -> None:
    covered = {type(make()).__name__ for _, make, _ in REPRESENTATIVES}
    assert covered == set(ops.MODULES)
    for name, op in ops.MODULES.items():
        assert op.cls.__name__ == name and ops.MODULE_CLASSES[op.cls] == name
        assert op.cls.__module__.startswith("torch.nn.modules.")


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    """Non-default values in every parameter and buffer, so a lost one shows."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dtype == torch.int64:
                t.fill_(3)


@pytest.mark.parametrize(
    ("case", "make", "make_input"), REPRESENTATIVES, ids=[r[0] for r in REPRESENTATIVES]
)
def test_allow_listed_module_rebuilds_from_its_spec_with_identical_output(
    case: str, make: Callable[[], nn.Module], make_input: Callable[[torch.Generator], Any]
) -> None:
    g = torch.Generator().manual_seed(0)
    original = make()
    _randomize(original, g)
    spec = ops.module_spec_of(original)
    assert spec.type == type(original).__name__
    # The spec is plain data that survives the wire.
    graph = Graph(
        name="one",
        nodes=(
            Node("x", "input", "x"),
            Node("m", "module", "m", (NodeRef("x"),), module=spec),
        ),
        inputs=("x",),
        outputs=("m",),
        params=(),
    )
    assert graph_serde.decode_graph(graph_serde.encode_graph(graph)).node("m").module == spec

    rebuilt = ops.build_module(spec)
    assert type(rebuilt) is type(original)
    assert ops.module_spec_of(rebuilt).attrs == tuple(
        (k, False if k == "inplace" else v) for k, v in spec.attrs
    )
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    for mode in ("train", "eval"):
        original.train(mode == "train")
        rebuilt.train(mode == "train")
        x = make_input(g)
        torch.manual_seed(1)
        expected = original(x.clone())
        torch.manual_seed(1)
        got = rebuilt(x.clone())
        assert got.shape == expected.shape, mode
        assert torch.equal(got, expected), mode
    # Running statistics were updated the same way.
    for (name, a), (_, b) in zip(
        original.state_dict().items(), rebuilt.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


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
def test_in_place_variants_rebuild_out_of_place(make: Callable[[], nn.Module]) -> None:
    original = make()
    spec = ops.module_spec_of(original)
    assert spec.attr_dict()["inplace"] is True
    rebuilt = ops.build_module(spec)
    assert rebuilt.inplace is False  # type: ignore[union-attr]
    x = torch.randn(8, 8)
    before = x.clone()
    torch.manual_seed(2)
    out = rebuilt(x)
    assert torch.equal(x, before), "the rebuilt module wrote into its input"
    torch.manual_seed(2)
    assert torch.equal(out, original(before.clone()))


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        _bad(
            ModuleSpec("LSTM", (("input_size", 4),)),
            r"module type 'LSTM' is not in the allow-list",
            "unlisted",
        ),
        _bad(ModuleSpec("Module"), r"'Module' is not in the allow-list", "unlisted"),
        _bad(ModuleSpec("linear"), r"'linear' is not in the allow-list", "unlisted"),
        _bad(
            ModuleSpec("Linear", (("in_features", 0), ("out_features", 2), ("bias", True))),
            r"Linear.*in_features=0 must be an integer in \[1,",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", -1), ("out_features", 2), ("bias", True))),
            r"in_features=-1",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", True), ("out_features", 2), ("bias", True))),
            r"in_features=True",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", 2.0), ("out_features", 2), ("bias", True))),
            r"in_features=2.0",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", 1 << 40), ("out_features", 2), ("bias", True))),
            r"in_features=1099511627776",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", 2), ("out_features", 2), ("bias", 1))),
            r"bias=1 must be a bool",
        ),
        _bad(
            ModuleSpec("Linear", (("in_features", 2), ("out_features", 2))),
            r"do not match",
            "missing-attr",
        ),
        _bad(
            ModuleSpec(
                "Linear",
                (("in_features", 2), ("out_features", 2), ("bias", True), ("device", "cuda:3")),
            ),
            r"do not match",
            "extra-attr",
        ),
        _bad(ModuleSpec("Dropout", (("p", 2.0), ("inplace", False))), r"Dropout.*p=2.0"),
        _bad(ModuleSpec("Dropout", (("p", -0.1), ("inplace", False))), r"p=-0.1"),
        _bad(ModuleSpec("Dropout", (("p", "0.5"), ("inplace", False))), r"p='0.5'"),
        _bad(
            ModuleSpec(
                "Embedding",
                (
                    ("num_embeddings", 4),
                    ("embedding_dim", 2),
                    ("padding_idx", None),
                    ("max_norm", 1.0),
                    ("scale_grad_by_freq", False),
                    ("sparse", False),
                ),
            ),
            r"max_norm=1.0",
        ),
        _bad(
            ModuleSpec(
                "Embedding",
                (
                    ("num_embeddings", 4),
                    ("embedding_dim", 2),
                    ("padding_idx", None),
                    ("max_norm", None),
                    ("scale_grad_by_freq", False),
                    ("sparse", True),
                ),
            ),
            r"sparse=True",
        ),
        _bad(
            ModuleSpec(
                "LayerNorm",
                (
                    ("normalized_shape", ()),
                    ("eps", 1e-5),
                    ("elementwise_affine", True),
                    ("bias", True),
                ),
            ),
            r"normalized_shape=\(\)",
        ),
        _bad(
            ModuleSpec(
                "Conv2d",
                (
                    ("in_channels", 1),
                    ("out_channels", 1),
                    ("kernel_size", (3,)),
                    ("stride", (1, 1)),
                    ("padding", (0, 0)),
                    ("dilation", (1, 1)),
                    ("groups", 1),
                    ("bias", True),
                    ("padding_mode", "zeros"),
                ),
            ),
            r"kernel_size=\(3,\) must be a 2-tuple",
        ),
        _bad(
            ModuleSpec(
                "Conv2d",
                (
                    ("in_channels", 1),
                    ("out_channels", 1),
                    ("kernel_size", (3, 3)),
                    ("stride", (1, 1)),
                    ("padding", "full"),
                    ("dilation", (1, 1)),
                    ("groups", 1),
                    ("bias", True),
                    ("padding_mode", "zeros"),
                ),
            ),
            r"padding='full'",
        ),
        _bad(
            ModuleSpec(
                "Conv2d",
                (
                    ("in_channels", 1),
                    ("out_channels", 1),
                    ("kernel_size", (3, 3)),
                    ("stride", (1, 1)),
                    ("padding", (0, 0)),
                    ("dilation", (1, 1)),
                    ("groups", 1),
                    ("bias", True),
                    ("padding_mode", "os.system"),
                ),
            ),
            r"padding_mode='os.system'",
        ),
        _bad(
            ModuleSpec(
                "MaxPool2d",
                (
                    ("kernel_size", 2),
                    ("stride", 2),
                    ("padding", 0),
                    ("dilation", 1),
                    ("ceil_mode", False),
                    ("return_indices", True),
                ),
            ),
            r"return_indices=True",
        ),
        _bad(ModuleSpec("Softmax", (("dim", 100),)), r"dim=100"),
        _bad(ModuleSpec("GELU", (("approximate", "erf"),)), r"approximate='erf'"),
        _bad(
            ModuleSpec("LeakyReLU", (("negative_slope", 2.0), ("inplace", False))),
            r"negative_slope=2.0",
        ),
    ],
)
def test_invalid_module_spec_is_refused_naming_type_and_attribute(
    spec: ModuleSpec, pattern: str
) -> None:
    with pytest.raises(IRError, match=pattern):
        ops.build_module(spec)
    with pytest.raises(IRError, match=pattern):
        ops.build_module_check(spec)


# -- functions and methods -----------------------------------------------------------------


def test_function_name_returns_none_for_look_alikes() -> None:
    look_alikes: list[Any] = [
        lambda x: x,
        F.multi_head_attention_forward,
        os.system,
        builtins.eval,
        builtins.exec,
        builtins.setattr,
        torch.load,
        functools.partial(torch.add, alpha=2),
        functools.wraps(torch.add)(lambda *a: torch.add(*a)),
        torch.Tensor.add,
        torch.add_ if hasattr(torch, "add_") else torch.Tensor.add_,
        operator.iadd,
        operator.setitem,
        "torch.add",
        None,
    ]
    for fn in look_alikes:
        assert ops.function_name(fn) is None, fn
    assert ops.function_name(torch.add) == "torch.add"
    assert ops.function_name(F.relu) == "torch.nn.functional.relu"
    assert ops.function_name(operator.getitem) == "operator.getitem"
    assert ops.function_name(builtins.getattr) == "builtins.getattr"


def test_every_listed_function_maps_back_to_a_name_for_the_same_object() -> None:
    for name, fn in ops.FUNCTIONS.items():
        canonical = ops.function_name(fn)
        assert canonical is not None, name
        assert ops.FUNCTIONS[canonical] is fn


def test_method_allow_list_is_out_of_place_tensor_methods_only() -> None:
    for method in ops.METHODS:
        assert not method.endswith("_") and not method.startswith("_"), method
        assert callable(getattr(torch.Tensor, method)), method


def test_inplace_positions_match_the_functions_signatures() -> None:
    table = ops._INPLACE_POSITION
    for name, fn in ops.FUNCTIONS.items():
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue  # a C builtin without a signature takes no `inplace`
        if "inplace" in params:
            assert table.get(name) == params.index("inplace"), name
        else:
            assert name not in table, name


def _function_node(target: str, *args: Any, **kwargs: Any) -> Node:
    return Node("n", "function", target, tuple(args), tuple(kwargs.items()))


def _method_node(target: str, *args: Any, **kwargs: Any) -> Node:
    return Node("n", "method", target, (NodeRef("x"), *args), tuple(kwargs.items()))


def _case(node: Node, pattern: str) -> Any:
    return pytest.param(node, pattern, id=node.describe().removeprefix("n = "))


@pytest.mark.parametrize(
    "node",
    [
        *(_function_node("builtins.getattr", NodeRef("x"), a) for a in sorted(ops.TENSOR_ATTRS)),
        _method_node("to", torch.float16),
        _method_node("to", NodeRef("y")),
        _method_node("to", LOCAL_DEVICE, torch.float32, False),
        _method_node("to", device=LOCAL_DEVICE, dtype=torch.bfloat16, non_blocking=True),
        _method_node("to", None),
        _function_node("torch.zeros", (2, 2), device=LOCAL_DEVICE),
        _function_node("torch.arange", 4, device=NodeRef("dev")),
        _method_node("new_zeros", (2,), device=None),
        _function_node("torch.nn.functional.relu", NodeRef("x"), False),
        _function_node("torch.nn.functional.relu", NodeRef("x"), inplace=False),
        _function_node("torch.nn.functional.dropout", NodeRef("x"), 0.1, True, False),
        _function_node("torch.nn.functional.leaky_relu", NodeRef("x"), 0.3),
    ],
    ids=lambda n: n.describe().removeprefix("n = "),
)
def test_allowed_node_passes_the_check(node: Node) -> None:
    ops.check_node(node)


@pytest.mark.parametrize(
    ("node", "pattern"),
    [
        _case(
            _function_node("os.system", "true"), r"function 'os.system' is not in the allow-list"
        ),
        _case(_function_node("builtins.eval", "1"), r"'builtins.eval'"),
        _case(_function_node("torch.load", "f"), r"'torch.load'"),
        _case(_function_node("torch.nn.functional.multi_head_attention_forward"), r"multi_head"),
        _case(_method_node("__reduce__"), r"tensor method '__reduce__'"),
        _case(_method_node("add_", 1.0), r"tensor method 'add_'"),
        _case(_method_node("copy_", NodeRef("y")), r"tensor method 'copy_'"),
        _case(_method_node("numpy"), r"tensor method 'numpy'"),
        _case(Node("n", "method", "add", (1.0, NodeRef("x"))), r"needs the tensor it is called on"),
        _case(Node("n", "method", "add"), r"needs the tensor it is called on"),
        _case(_function_node("builtins.getattr", NodeRef("x"), "__class__"), r"not '__class__'"),
        _case(_function_node("builtins.getattr", NodeRef("x"), "data"), r"not 'data'"),
        _case(_function_node("builtins.getattr", NodeRef("x"), "grad"), r"not 'grad'"),
        _case(_function_node("builtins.getattr", NodeRef("x"), "_cdata"), r"not '_cdata'"),
        _case(_function_node("builtins.getattr", NodeRef("x"), NodeRef("y")), r"getattr"),
        _case(_function_node("builtins.getattr", NodeRef("x"), "shape", None), r"getattr"),
        _case(_function_node("builtins.getattr", NodeRef("x")), r"getattr"),
        _case(
            Node("n", "function", "builtins.getattr", (NodeRef("x"), "shape"), (("d", 1),)),
            r"getattr",
        ),
        _case(_method_node("to", "cuda:3"), r"\.to\(\) accepts .* not 'cuda:3'"),
        _case(_method_node("to", "cpu"), r"not 'cpu'"),
        _case(_method_node("to", 3), r"not 3"),
        _case(_method_node("to", device="cuda:3"), r"'cuda:3'"),
        _case(_method_node("to", memory_format=None), r"does not take memory_format="),
        _case(
            _function_node("torch.zeros", (2, 2), device="cuda:3"), r"torch.zeros .*device='cuda:3'"
        ),
        _case(_function_node("torch.ones_like", NodeRef("x"), device="cpu"), r"device='cpu'"),
        _case(_method_node("new_zeros", (2,), device="cuda:0"), r"new_zeros .*device='cuda:0'"),
        _case(
            _function_node("torch.add", NodeRef("x"), 1.0, out=NodeRef("y")), r"torch.add .*out="
        ),
        _case(
            _function_node("torch.nn.functional.normalize", NodeRef("x"), out=NodeRef("y")), r"out="
        ),
        _case(_method_node("add", 1.0, out=NodeRef("y")), r"add .*out="),
        _case(_function_node("torch.nn.functional.relu", NodeRef("x"), True), r"relu .*inplace"),
        _case(_function_node("torch.nn.functional.relu", NodeRef("x"), inplace=True), r"inplace"),
        _case(_function_node("torch.nn.functional.silu", NodeRef("x"), inplace=True), r"inplace"),
        _case(
            _function_node("torch.nn.functional.dropout", NodeRef("x"), 0.1, True, True),
            r"dropout .*inplace",
        ),
        _case(
            _function_node("torch.nn.functional.leaky_relu", NodeRef("x"), 0.1, True), r"inplace"
        ),
        _case(_function_node("torch.nn.functional.elu", NodeRef("x"), 1.0, True), r"inplace"),
        _case(Node("n", "input", "x", (1,)), r"takes no arguments"),
        _case(Node("n", "param", "w", (), (("k", 1),)), r"takes no arguments"),
    ],
)
def test_refused_node_is_an_ir_error_naming_node_and_operator(node: Node, pattern: str) -> None:
    with pytest.raises(IRError, match=r"node 'n'") as info:
        ops.check_node(node)
    assert re.search(pattern, str(info.value)), str(info.value)


def test_runtime_checks_refuse_a_method_or_getattr_on_a_non_tensor() -> None:
    method = Node("n", "method", "size", (NodeRef("x"),))
    with pytest.raises(IRError, match=r"method 'size' called on a int, not a tensor"):
        ops.call(method, [3], {}, None)
    getattr_node = Node("n", "function", "builtins.getattr", (NodeRef("x"), "shape"))
    with pytest.raises(IRError, match="getattr on a str, not a tensor"):
        ops.call(getattr_node, ["abc", "shape"], {}, None)
    assert ops.call(getattr_node, [torch.zeros(2, 3), "shape"], {}, None) == (2, 3)


def test_local_device_resolves_to_the_stage_device() -> None:
    device = torch.device("meta")
    env = {"x": torch.zeros(1)}
    assert ops.resolve(LOCAL_DEVICE, env, device) == device
    assert ops.resolve((LOCAL_DEVICE, NodeRef("x")), env, device) == (device, env["x"])


# -- capture -------------------------------------------------------------------------------


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


class UsesErfinv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfinv(torch.tanh(self.fc(x))).sum() + torch.erfinv(x).sum()


def _line_of(marker: str) -> int:
    """The line number of this file's line containing `marker`."""
    lines = inspect.getsource(inspect.getmodule(_line_of)).splitlines()  # type: ignore[arg-type]
    return next(i for i, line in enumerate(lines, 1) if marker in line and "_line_of" not in line)


def test_capture_refuses_an_unlisted_function_naming_the_operator_and_module_path() -> None:
    with pytest.raises(CaptureError) as info:
        capture(UsesFFT(), {"x": torch.zeros(2, 4)})
    message = str(info.value)
    assert "1 operator(s) outside the allow-list" in message
    assert re.search(r"function torch\.fft\.fft at blocks\.1\b", message), message

    with pytest.raises(CaptureError) as info:
        capture(UsesErfinv(), {"x": torch.zeros(2, 4)})
    message = str(info.value)
    # Each refused operator is listed, by its public name, at the root module.
    assert "2 operator(s) outside the allow-list" in message
    assert "function torch.special.erfinv at <root>" in message, message
    assert "function torch.erfinv at <root>" in message, message


def test_capture_error_points_at_the_users_file_and_line() -> None:
    with pytest.raises(CaptureError) as info:
        capture(UsesFFT(), {"x": torch.zeros(2, 4)})
    expected = f"test_ops.py:{_line_of('# the refused line')} in forward"
    assert expected in str(info.value)


def test_capture_refuses_lstm_naming_its_class_and_path() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4, batch_first=True))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.enc(x)[0].sum()

    with pytest.raises(CaptureError, match=r"module torch\.nn\.modules\.rnn\.LSTM at enc\.1\b"):
        capture(Encoder(), {"x": torch.zeros(2, 3, 4)})


def test_capture_refuses_an_unlisted_tensor_method_and_an_in_place_one() -> None:
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.add_(1).cumprod(0).sum()

    with pytest.raises(CaptureError) as info:
        capture(InPlace(), {"x": torch.zeros(2, 3)})
    assert "tensor method .add_()" in str(info.value)
    assert "tensor method .cumprod()" in str(info.value)


def test_data_dependent_control_flow_is_a_capture_error() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(CaptureError, match=r"cannot trace Branchy: .*control flow") as info:
        capture(Branchy(), {"x": torch.zeros(2, 3)})
    assert type(info.value) is CaptureError
    assert isinstance(info.value.__cause__, fx.proxy.TraceError)


def test_tied_weights_are_refused_naming_both_parameters() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(t)).sum()

    with pytest.raises(CaptureError, match=r"'embed\.weight' and 'head\.weight' .*tied"):
        capture(Tied(), {"t": torch.zeros(2, 3, dtype=torch.int64)})


class MovesToDevice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x.to(torch.device("cpu")))
        # A factory traces (rather than becoming a constant) when its size comes from a proxy.
        bias = torch.ones(h.shape[1], device=torch.device("cpu"))
        return h + bias


def test_device_constant_captures_as_the_local_device_and_runs() -> None:
    torch.manual_seed(0)
    model = MovesToDevice()
    captured = capture(model, {"x": torch.zeros(2, 4)})
    graph = graph_serde.decode_graph(graph_serde.encode_graph(captured.graph))
    assert graph == captured.graph
    to = next(n for n in graph.nodes if n.op == "method" and n.target == "to")
    assert isinstance(to.args[1], LocalDevice)
    ones = next(n for n in graph.nodes if n.target == "torch.ones")
    assert isinstance(dict(ones.kwargs)["device"], LocalDevice)

    x = torch.randn(5, 4)
    stage = StageModule(graph, captured.state)
    (out,) = stage({"x": x}).values()
    assert torch.equal(out, model(x))
    # On another device the same graph follows the stage, not the device it was captured on.
    meta = StageModule(graph, device="meta")
    (out_meta,) = meta({"x": x.to("meta")}).values()
    assert out_meta.device.type == "meta" and out_meta.shape == (5, 3)


def test_capture_refuses_a_device_named_by_a_string() -> None:
    class NamedDevice(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.ones(x.shape[1], device="cpu")

    with pytest.raises(CaptureError, match=r"torch\.ones .*device='cpu'"):
        capture(NamedDevice(), {"x": torch.zeros(2, 3)})


def test_capture_refuses_functional_in_place_activation() -> None:
    class InPlaceRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(x), inplace=True).sum()

    with pytest.raises(CaptureError, match=r"relu may only run with inplace=False"):
        capture(InPlaceRelu(), {"x": torch.zeros(2, 3)})


def test_subclass_of_an_allowed_module_is_traced_through_not_rebuilt_as_its_base() -> None:
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
    assert not any(n.op == "module" for n in captured.graph.nodes)
    assert any(n.target == "torch.nn.functional.linear" for n in captured.graph.nodes)
    x = torch.randn(3, 4)
    (out,) = StageModule(captured.graph, captured.state)({"x": x}).values()
    assert torch.equal(out, model(x))
