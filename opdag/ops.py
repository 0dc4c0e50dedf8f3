"""The operator allow-list: the only operators a graph may name and a worker may run.

Three tables: module types (rebuilt from validated constructor attributes), functions (by
canonical name) and tensor methods. Capture refuses anything outside them; a received graph
is checked against them before a single operator is built, so a worker runs no code it was
sent, only these.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opdag.errors import IRError
from opdag.ir import (
    LOCAL_DEVICE,
    Arg,
    Graph,
    ListArg,
    LocalDevice,
    ModuleSpec,
    Node,
    NodeRef,
    SliceArg,
)

# -- module types --------------------------------------------------------------------------

Check = Callable[[str, Any], None]


def _fail(name: str, value: Any, what: str) -> None:
    raise IRError(f"attribute {name}={value!r} must be {what}")


def _int(lo: int = 0, hi: int = 1 << 31) -> Check:
    def check(name: str, v: Any) -> None:
        if type(v) is not int or not lo <= v <= hi:
            _fail(name, v, f"an integer in [{lo}, {hi}]")

    return check


def _float(lo: float = 0.0, hi: float = float("inf")) -> Check:
    def check(name: str, v: Any) -> None:
        if type(v) not in (int, float) or not lo <= v <= hi:
            _fail(name, v, f"a number in [{lo}, {hi}]")

    return check


def _bool(name: str, v: Any) -> None:
    if type(v) is not bool:
        _fail(name, v, "a bool")


def _optional(inner: Check) -> Check:
    def check(name: str, v: Any) -> None:
        if v is not None:
            inner(name, v)

    return check


def _ints(n: int | None, lo: int = 0, hi: int = 1 << 31) -> Check:
    def check(name: str, v: Any) -> None:
        ok = isinstance(v, tuple) and (n is None or len(v) == n) and 0 < len(v) <= 8
        if not ok or any(type(x) is not int or not lo <= x <= hi for x in v):
            size = "a tuple" if n is None else f"a {n}-tuple"
            _fail(name, v, f"{size} of integers in [{lo}, {hi}]")

    return check


def _choice(*options: Any) -> Check:
    def check(name: str, v: Any) -> None:
        if v not in options:
            _fail(name, v, f"one of {options}")

    return check


def _either(*checks: Check) -> Check:
    def check(name: str, v: Any) -> None:
        errors = []
        for c in checks:
            try:
                c(name, v)
                return
            except IRError as e:
                errors.append(str(e).split(" must be ")[-1])
        _fail(name, v, " or ".join(errors))

    return check


_DIM = _int(-64, 64)
_FEATURES = _int(1)
_EPS = _float(0.0, 1.0)


@dataclass(frozen=True)
class ModuleOp:
    """An allow-listed module type: how to read its attributes and rebuild it."""

    cls: type[nn.Module]
    attrs: Mapping[str, Check]
    # Attributes stored on the module under another form than the constructor takes.
    readers: Mapping[str, Callable[[nn.Module], Any]]
    # Attributes forced on rebuild (in-place variants compute the same values, but may not
    # write into a tensor another stage sent).
    forced: Mapping[str, Any]

    def read_attrs(self, module: nn.Module) -> tuple[tuple[str, Arg], ...]:
        out = []
        for name in self.attrs:
            reader = self.readers.get(name)
            value = reader(module) if reader else getattr(module, name)
            if isinstance(value, (list, torch.Size)):
                value = tuple(value)
            out.append((name, value))
        return tuple(out)

    def check(self, attrs: Mapping[str, Arg]) -> None:
        missing = [a for a in self.attrs if a not in attrs]
        extra = [a for a in attrs if a not in self.attrs]
        if missing or extra:
            raise IRError(
                f"{self.cls.__name__}: attributes {sorted(attrs)} do not match "
                f"the expected {sorted(self.attrs)}"
            )
        for name, check in self.attrs.items():
            check(name, attrs[name])

    def build(self, attrs: Mapping[str, Arg]) -> nn.Module:
        self.check(attrs)
        kwargs = {**attrs, **self.forced}
        return self.cls(**kwargs)


def _has_bias(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None


def _module(
    cls: type[nn.Module],
    attrs: Mapping[str, Check] | None = None,
    *,
    readers: Mapping[str, Callable[[nn.Module], Any]] | None = None,
    forced: Mapping[str, Any] | None = None,
) -> tuple[str, ModuleOp]:
    return cls.__name__, ModuleOp(cls, attrs or {}, readers or {}, forced or {})


_INPLACE = {"inplace": False}

MODULES: dict[str, ModuleOp] = dict(
    [
        _module(
            nn.Linear,
            {"in_features": _FEATURES, "out_features": _FEATURES, "bias": _bool},
            readers={"bias": _has_bias},
        ),
        _module(
            nn.Embedding,
            {
                "num_embeddings": _FEATURES,
                "embedding_dim": _FEATURES,
                "padding_idx": _optional(_int(-(1 << 31))),
                "max_norm": _choice(None),
                "scale_grad_by_freq": _bool,
                "sparse": _choice(False),
            },
        ),
        _module(
            nn.LayerNorm,
            {
                "normalized_shape": _ints(None, 1),
                "eps": _EPS,
                "elementwise_affine": _bool,
                "bias": _bool,
            },
            readers={"bias": _has_bias},
        ),
        _module(
            nn.RMSNorm,
            {
                "normalized_shape": _ints(None, 1),
                "eps": _optional(_EPS),
                "elementwise_affine": _bool,
            },
        ),
        _module(
            nn.GroupNorm,
            {"num_groups": _FEATURES, "num_channels": _FEATURES, "eps": _EPS, "affine": _bool},
        ),
        _module(
            nn.Conv1d,
            {
                "in_channels": _FEATURES,
                "out_channels": _FEATURES,
                "kernel_size": _ints(1, 1),
                "stride": _ints(1, 1),
                "padding": _either(_ints(1), _choice("same", "valid")),
                "dilation": _ints(1, 1),
                "groups": _FEATURES,
                "bias": _bool,
                "padding_mode": _choice("zeros", "reflect", "replicate", "circular"),
            },
            readers={"bias": _has_bias},
        ),
        _module(
            nn.Conv2d,
            {
                "in_channels": _FEATURES,
                "out_channels": _FEATURES,
                "kernel_size": _ints(2, 1),
                "stride": _ints(2, 1),
                "padding": _either(_ints(2), _choice("same", "valid")),
                "dilation": _ints(2, 1),
                "groups": _FEATURES,
                "bias": _bool,
                "padding_mode": _choice("zeros", "reflect", "replicate", "circular"),
            },
            readers={"bias": _has_bias},
        ),
        *(
            _module(
                bn,
                {
                    "num_features": _FEATURES,
                    "eps": _EPS,
                    "momentum": _optional(_float(0.0, 1.0)),
                    "affine": _bool,
                    "track_running_stats": _bool,
                },
            )
            for bn in (nn.BatchNorm1d, nn.BatchNorm2d)
        ),
        _module(nn.ReLU, {"inplace": _bool}, forced=_INPLACE),
        _module(nn.SiLU, {"inplace": _bool}, forced=_INPLACE),
        _module(
            nn.LeakyReLU, {"negative_slope": _float(0.0, 1.0), "inplace": _bool}, forced=_INPLACE
        ),
        _module(nn.GELU, {"approximate": _choice("none", "tanh")}),
        _module(nn.Tanh),
        _module(nn.Sigmoid),
        _module(nn.Identity),
        _module(nn.Softmax, {"dim": _optional(_DIM)}),
        _module(nn.LogSoftmax, {"dim": _optional(_DIM)}),
        _module(nn.Dropout, {"p": _float(0.0, 1.0), "inplace": _bool}, forced=_INPLACE),
        _module(nn.Flatten, {"start_dim": _DIM, "end_dim": _DIM}),
        _module(
            nn.MaxPool2d,
            {
                "kernel_size": _either(_int(1), _ints(2, 1)),
                "stride": _either(_int(1), _ints(2, 1)),
                "padding": _either(_int(0), _ints(2)),
                "dilation": _either(_int(1), _ints(2, 1)),
                "ceil_mode": _bool,
                "return_indices": _choice(False),
            },
        ),
        _module(
            nn.AvgPool2d,
            {
                "kernel_size": _either(_int(1), _ints(2, 1)),
                "stride": _either(_int(1), _ints(2, 1)),
                "padding": _either(_int(0), _ints(2)),
                "ceil_mode": _bool,
                "count_include_pad": _bool,
                "divisor_override": _optional(_int(1)),
            },
        ),
        _module(nn.AdaptiveAvgPool2d, {"output_size": _either(_int(1), _ints(2, 1))}),
    ]
)

MODULE_CLASSES: dict[type[nn.Module], str] = {op.cls: name for name, op in MODULES.items()}


def module_spec_of(module: nn.Module) -> ModuleSpec:
    """The spec that rebuilds an allow-listed module (its exact type must be listed)."""
    name = MODULE_CLASSES[type(module)]
    return ModuleSpec(type=name, attrs=MODULES[name].read_attrs(module))


def build_module(spec: ModuleSpec) -> nn.Module:
    """Rebuild an allow-listed module from its spec, after validating every attribute."""
    op = MODULES.get(spec.type)
    if op is None:
        raise IRError(f"module type {spec.type!r} is not in the allow-list")
    try:
        return op.build(spec.attr_dict())
    except IRError as e:
        raise IRError(f"{spec.type}: {e}") from None


# -- functions -----------------------------------------------------------------------------

_TORCH_FUNCTIONS = (
    "abs add addmm amax amin arange argmax argmin baddbmm bmm cat chunk clamp cos cumsum "
    "div einsum eq erf exp flatten flip full full_like gather gt logsumexp log log_softmax "
    "lt masked_fill matmul max maximum mean min minimum mm mul ne neg ones ones_like outer "
    "permute pow relu reshape roll rsqrt scatter_add sigmoid sin softmax split sqrt square "
    "squeeze stack sub sum tanh topk transpose tril triu unsqueeze where zeros zeros_like"
).split()

_FUNCTIONAL = (
    "adaptive_avg_pool2d avg_pool2d batch_norm conv1d conv2d cross_entropy dropout elu "
    "embedding gelu group_norm layer_norm leaky_relu linear log_softmax max_pool2d mse_loss "
    "nll_loss normalize one_hot pad relu rms_norm scaled_dot_product_attention silu softmax "
    "softplus"
).split()

_OPERATORS = (
    "add sub mul truediv floordiv mod pow neg pos matmul getitem eq ne lt le gt ge and_ or_ invert"
).split()

FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH_FUNCTIONS},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in _FUNCTIONAL},
    **{f"operator.{n}": getattr(operator, n) for n in _OPERATORS},
    "builtins.getattr": builtins.getattr,
}

_FUNCTION_NAMES: dict[int, str] = {}
for _name, _fn in FUNCTIONS.items():
    _FUNCTION_NAMES.setdefault(id(_fn), _name)

# Attributes of a tensor a graph may read with getattr (fx records `x.shape` that way).
TENSOR_ATTRS = frozenset({"shape", "dtype", "ndim", "device", "T", "mT"})

# Where the listed functional activations take `inplace` positionally; like in-place methods,
# `inplace=True` (or `out=`) would write into a tensor another stage sent or autograd saved.
_INPLACE_POSITION = {
    "torch.nn.functional.relu": 1,
    "torch.nn.functional.silu": 1,
    "torch.nn.functional.leaky_relu": 2,
    "torch.nn.functional.elu": 2,
    "torch.nn.functional.dropout": 3,
}


def function_name(fn: Any) -> str | None:
    """The canonical name of an allow-listed callable, or None."""
    name = _FUNCTION_NAMES.get(id(fn))
    return name if name is not None and FUNCTIONS[name] is fn else None


# Where the C bindings of public torch namespaces say they live, and the prefix their names
# carry there (`torch.fft.fft` is `torch._C._fft.fft_fft`, `torch.erfinv` is
# `torch._VariableFunctionsClass.erfinv`).
_PUBLIC_NAMES = {
    "torch": ("torch", "_VariableFunctionsClass."),
    "torch._C._nn": ("torch.nn.functional", ""),
    "torch._C._fft": ("torch.fft", "fft_"),
    "torch._C._special": ("torch.special", "special_"),
    "torch._C._linalg": ("torch.linalg", "linalg_"),
    "_operator": ("operator", ""),
}


def describe_callable(fn: Any) -> str:
    """A readable dotted name for any callable, for error messages."""
    module = getattr(fn, "__module__", None) or ""
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if module in _PUBLIC_NAMES:
        module, prefix = _PUBLIC_NAMES[module]
        qual = str(qual).removeprefix(prefix)
    return f"{module}.{qual}" if module else str(qual)


# -- tensor methods ------------------------------------------------------------------------

# Out-of-place methods only: an in-place method could write into a tensor another stage
# sent or that autograd saved.
METHODS = frozenset(
    (
        "abs add amax argmax bfloat16 bool chunk clamp contiguous cumsum detach dim div exp "
        "expand expand_as flatten float gather half int log log_softmax long masked_fill matmul "
        "max mean min mul narrow ne neg new_ones new_zeros norm permute pow relu repeat reshape "
        "reshape_as rsqrt scatter_add select sigmoid size softmax split sqrt squeeze std sub "
        "sum t tanh to topk transpose tril triu type_as unflatten unsqueeze var view view_as"
    ).split()
)


# -- validation and execution ----------------------------------------------------------------


def check_node(node: Node) -> None:
    """Raise `IRError` unless the node names an allow-listed operator with valid arguments."""
    where = f"node {node.name!r}"
    if node.op == "module":
        assert node.module is not None
        try:
            build_module_check(node.module)
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
    elif node.op == "function":
        if node.target not in FUNCTIONS:
            raise IRError(f"{where}: function {node.target!r} is not in the allow-list")
        if node.target == "builtins.getattr":
            attr = node.args[1] if len(node.args) == 2 else None
            if node.kwargs or not isinstance(attr, str) or attr not in TENSOR_ATTRS:
                raise IRError(
                    f"{where}: getattr may only read a tensor's {sorted(TENSOR_ATTRS)}, "
                    f"not {attr!r}"
                )
    elif node.op == "method":
        if node.target not in METHODS:
            raise IRError(f"{where}: tensor method {node.target!r} is not in the allow-list")
        if not node.args or not isinstance(node.args[0], NodeRef):
            raise IRError(f"{where}: a method call needs the tensor it is called on")
        if node.target == "to":
            _check_to_args(where, node)
    elif node.op in ("input", "param") and (node.args or node.kwargs):
        raise IRError(f"{where}: takes no arguments")
    if node.op in ("function", "method"):
        _check_no_side_effects(where, node)


def build_module_check(spec: ModuleSpec) -> None:
    op = MODULES.get(spec.type)
    if op is None:
        raise IRError(f"module type {spec.type!r} is not in the allow-list")
    try:
        op.check(spec.attr_dict())
    except IRError as e:
        raise IRError(f"{spec.type}: {e}") from None


def _check_no_side_effects(where: str, node: Node) -> None:
    """Refuse arguments that write into an existing tensor or name a device."""
    kwargs = dict(node.kwargs)
    if "out" in kwargs:
        raise IRError(f"{where}: {node.target} may not write into an existing tensor (out=)")
    position = _INPLACE_POSITION.get(node.target)
    inplace = kwargs.get("inplace", False)
    if position is not None and len(node.args) > position:
        inplace = node.args[position]
    if inplace is not False:
        raise IRError(f"{where}: {node.target} may only run with inplace=False, not {inplace!r}")
    device = kwargs.get("device")
    if device is not None and not isinstance(device, (NodeRef, LocalDevice)):
        raise IRError(
            f"{where}: {node.target} may only use the stage's own device or a tensor's, "
            f"not device={device!r}"
        )


def _check_to_args(where: str, node: Node) -> None:
    # `.to` may change dtype or move to the stage's own device; never to a named device.
    for arg in (*node.args[1:], *(v for _, v in node.kwargs)):
        if not isinstance(arg, (torch.dtype, NodeRef, LocalDevice, bool)) and arg is not None:
            raise IRError(
                f"{where}: .to() accepts a dtype, a tensor or the local device, not {arg!r}"
            )
    for key, _ in node.kwargs:
        if key not in ("dtype", "device", "non_blocking", "copy"):
            raise IRError(f"{where}: .to() does not take {key}=")


def validate_graph(graph: Graph) -> None:
    """Full check of a graph received from anywhere: structure, then every operator."""
    graph.check_structure()
    for node in graph.nodes:
        check_node(node)


def resolve(arg: Arg, env: Mapping[str, Any], device: torch.device) -> Any:
    """The runtime value of an argument, given the values computed so far."""
    if isinstance(arg, NodeRef):
        return env[arg.name]
    if isinstance(arg, tuple):
        return tuple(resolve(a, env, device) for a in arg)
    if isinstance(arg, ListArg):
        return [resolve(a, env, device) for a in arg.items]
    if isinstance(arg, SliceArg):
        return slice(*(resolve(a, env, device) for a in (arg.start, arg.stop, arg.step)))
    if isinstance(arg, LocalDevice):
        return device
    return arg


def call(node: Node, args: list[Any], kwargs: dict[str, Any], module: nn.Module | None) -> Any:
    """Run one validated compute node on resolved arguments."""
    if node.op == "module":
        assert module is not None
        return module(*args, **kwargs)
    if node.op == "function":
        if node.target == "builtins.getattr" and not isinstance(args[0], torch.Tensor):
            raise IRError(
                f"node {node.name!r}: getattr on a {type(args[0]).__name__}, not a tensor"
            )
        return FUNCTIONS[node.target](*args, **kwargs)
    if node.op == "method":
        receiver = args[0]
        if not isinstance(receiver, torch.Tensor):
            raise IRError(
                f"node {node.name!r}: method {node.target!r} called on a "
                f"{type(receiver).__name__}, not a tensor"
            )
        # Looked up on the Tensor class so no other object's attribute is ever called.
        return getattr(torch.Tensor, node.target)(*args, **kwargs)
    raise IRError(f"node {node.name!r}: a {node.op} node is not an operator")


__all__ = [
    "FUNCTIONS",
    "LOCAL_DEVICE",
    "METHODS",
    "MODULES",
    "MODULE_CLASSES",
    "ModuleOp",
    "build_module",
    "call",
    "check_node",
    "function_name",
    "module_spec_of",
    "resolve",
    "validate_graph",
]
