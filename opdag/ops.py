"""The operator allow-list: the only operators a graph may name and a worker may run.

A captured graph is ATen-level (`torch.export`), so the allow-list is a table of ATen
operators plus the few Python operators torch.export leaves on symbolic sizes. A node names
its operator as `aten.<name>.<overload>`; it is allowed when `<name>` is in the table and
the overload neither writes into its arguments nor takes an argument of a kind a graph may
not carry. Every argument is checked against the operator's own schema (a tensor where a
tensor goes, a number where a number goes), and a few operators check their attributes
further. Capture refuses anything else; a received graph is checked against this table
before a single operator runs, so a worker runs no code it was sent, only these.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch

from opdag.errors import IRError
from opdag.ir import (
    LOCAL_DEVICE,
    Arg,
    Graph,
    ListArg,
    LocalDevice,
    Node,
    NodeRef,
    SliceArg,
)

# -- the ATen table ------------------------------------------------------------------------

_ATEN = frozenset(
    # arithmetic and elementwise functions
    "abs add sub rsub mul div neg pow rsqrt sqrt square reciprocal exp exp2 expm1 log log1p "
    "log2 sin cos tan tanh sigmoid erf erfinv sign floor ceil round trunc remainder fmod "
    "floor_divide clamp clamp_min clamp_max maximum minimum where masked_fill lerp "
    "nan_to_num isinf isnan eq ne lt le gt ge logical_and logical_or logical_not logical_xor "
    "bitwise_and bitwise_or bitwise_not bitwise_xor __and__ __or__ __xor__ "
    # activations
    "relu relu6 gelu silu leaky_relu elu selu celu softplus mish hardtanh hardswish "
    "hardsigmoid glu log_sigmoid "
    # reductions and scans
    "sum mean amax amin max min argmax argmin logsumexp var std var_mean std_mean prod all "
    "any norm linalg_vector_norm topk sort argsort cumsum cumprod diff "
    # shapes, views and copies
    "view reshape _unsafe_view permute transpose t unsqueeze squeeze flatten unflatten "
    "expand expand_as contiguous clone alias detach lift_fresh_copy slice select narrow "
    "index_select index gather scatter scatter_add chunk split split_with_sizes unbind cat "
    "stack repeat repeat_interleave flip roll tril triu diagonal movedim _to_copy to type_as "
    "view_as masked_select broadcast_tensors broadcast_to index_put index_add scatter_reduce "
    "addcmul addcdiv atan2 hypot log10 sinh cosh asin acos atan frac "
    # new tensors
    "zeros ones full arange zeros_like ones_like full_like new_zeros new_ones new_full "
    "scalar_tensor one_hot "
    # networks
    "linear matmul mm bmm addmm baddbmm einsum outer embedding layer_norm rms_norm "
    "group_norm batch_norm conv1d conv2d max_pool2d avg_pool2d adaptive_avg_pool2d softmax "
    "log_softmax _softmax _log_softmax dropout native_dropout scaled_dot_product_attention "
    "cross_entropy_loss nll_loss nll_loss_nd mse_loss l1_loss smooth_l1_loss "
    "binary_cross_entropy_with_logits pad constant_pad_nd "
    # sizes (symbolic integers of a graph captured with a dynamic batch)
    "sym_size sym_numel".split()
)

# Operators that write into their first argument; allowed only on a buffer of the graph (a
# batch-norm's step counter), never on a value another stage sent or autograd saved.
BUFFER_UPDATES = frozenset({"aten.add_.Tensor", "aten.add_.Scalar"})

# Python operators torch.export leaves on symbolic sizes (`b * t`, `x.shape[0] // 2`).
_PYTHON: dict[str, Callable[..., Any]] = {
    **{
        f"operator.{n}": getattr(operator, n)
        for n in "add sub mul truediv floordiv mod pow neg eq ne lt le gt ge getitem".split()
    },
    "math.ceil": math.ceil,
    "math.floor": math.floor,
    "torch.sym_max": torch.sym_max,
    "torch.sym_min": torch.sym_min,
    "torch.sym_float": torch.sym_float,
    "torch.sym_int": torch.sym_int,
}

# The argument kinds a graph may pass to an ATen operator; anything else (a generator, a
# stream, a storage) makes the overload unusable.
_ARG_KINDS = frozenset(
    {
        "TensorType",
        "IntType",
        "SymIntType",
        "FloatType",
        "BoolType",
        "NumberType",
        "ScalarTypeType",
        "DeviceObjType",
        "LayoutType",
        "MemoryFormatType",
        "StringType",
    }
)

# Layouts and memory formats travel by name.
ENUMS: dict[str, Any] = {
    "strided": torch.strided,
    "contiguous_format": torch.contiguous_format,
    "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}

# Where an operator takes its training flag: captured True, it follows the stage's
# train/eval mode (a flag captured False stays off).
TRAINING_FLAGS = {
    "aten.dropout.default": 2,
    "aten.native_dropout.default": 2,
    "aten.batch_norm.default": 5,
}

_MAX_DIM = 1 << 31
_MAX_NEW_ELEMENTS = 1 << 34


def _kind(argument: Any) -> tuple[str, ...]:
    """The kind of a schema argument with its wrappers: ("OptionalType", "ListType",
    "SymIntType"); `real_type` keeps the kinds the Python binding calls int (ScalarType,
    Layout, MemoryFormat)."""
    t = argument.real_type
    out: list[str] = []
    while t.kind() in ("OptionalType", "ListType"):
        out.append(t.kind())
        t = t.getElementType()
    out.append(t.kind())
    return tuple(out)


@functools.cache
def overload(name: str) -> torch._ops.OpOverload:
    """The ATen overload a node names, or `IRError` when it is outside the allow-list (only
    allowed names are cached: the table bounds the cache)."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise IRError(f"operator {name!r} is not in the allow-list")
    _, packet, which = parts
    if packet not in _ATEN and name not in BUFFER_UPDATES:
        raise IRError(f"operator {name!r} is not in the allow-list")
    op_packet = getattr(torch.ops.aten, packet)
    if which not in op_packet.overloads():
        raise IRError(f"operator {packet!r} has no overload {which!r}")
    op: torch._ops.OpOverload = getattr(op_packet, which)
    schema = op._schema
    if schema.is_mutable and name not in BUFFER_UPDATES:
        raise IRError(f"operator {name!r} writes into its arguments and is not allowed")
    for a in schema.arguments:
        if _kind(a)[-1] not in _ARG_KINDS:
            raise IRError(f"operator {name!r} takes a {a.type} ({a.name}) and is not allowed")
    first = schema.arguments[0] if schema.arguments else None
    if first is not None and _kind(first)[-1] == "StringType" and packet != "einsum":
        raise IRError(f"operator {name!r} works on strings and is not allowed")
    return op


def is_allowed(name: str) -> bool:
    """Whether capture may keep an operator of this name."""
    if name in _PYTHON:
        return True
    try:
        overload(name)
    except IRError:
        return False
    return True


# -- argument checks -----------------------------------------------------------------------


def _check_value(where: str, arg_name: str, kind: tuple[str, ...], value: Arg) -> None:
    """Raise unless `value` may be passed where the schema expects `kind`."""
    if isinstance(value, NodeRef):
        return  # a tensor or a symbolic integer; its kind is checked when it runs
    head, rest = kind[0], kind[1:]
    if head == "OptionalType":
        if value is None:
            return
        _check_value(where, arg_name, rest, value)
        return
    if head == "ListType":
        items = value.items if isinstance(value, ListArg) else value
        if not isinstance(items, tuple):
            raise IRError(f"{where}: {arg_name} must be a list, not {value!r}")
        for item in items:
            _check_value(where, arg_name, rest, item)
        return
    ok = {
        # A number where a tensor goes is wrapped as a 0-d tensor (`x * 0.5`).
        "TensorType": isinstance(value, (int, float)) and not isinstance(value, bool),
        "IntType": isinstance(value, int) and not isinstance(value, bool),
        "SymIntType": isinstance(value, int) and not isinstance(value, bool),
        "FloatType": isinstance(value, (int, float)) and not isinstance(value, bool),
        "BoolType": isinstance(value, bool),
        "NumberType": isinstance(value, (int, float, bool)),
        "ScalarTypeType": isinstance(value, torch.dtype),
        "DeviceObjType": isinstance(value, LocalDevice),
        "LayoutType": value == "strided",
        "MemoryFormatType": isinstance(value, str) and value in ENUMS,
        "StringType": isinstance(value, str),
    }.get(head, False)
    if not ok:
        what = "the stage's own device" if head == "DeviceObjType" else head.removesuffix("Type")
        raise IRError(f"{where}: {arg_name}={value!r} must be {what.lower()}")


def _check_aten(where: str, node: Node) -> None:
    op = overload(node.target)
    params = op._schema.arguments
    positional = [a for a in params if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise IRError(
            f"{where}: {node.target} takes {len(positional)} positional arguments, "
            f"got {len(node.args)}"
        )
    by_name = {a.name: a for a in params}
    given = {a.name for a in positional[: len(node.args)]}
    for a, value in zip(positional, node.args, strict=False):
        _check_value(where, a.name, _kind(a), value)
    for key, value in node.kwargs:
        named = by_name.get(key)
        if named is None or key in given:
            raise IRError(f"{where}: {node.target} takes no argument {key}=")
        given.add(key)
        _check_value(where, key, _kind(named), value)
    missing = [a.name for a in params if a.name not in given and not a.has_default_value()]
    if missing:
        raise IRError(f"{where}: {node.target} needs {', '.join(missing)}")
    values = dict(zip((a.name for a in positional), node.args, strict=False))
    values.update(node.kwargs)
    _check_attributes(where, node.target, values)


def _check_attributes(where: str, name: str, values: Mapping[str, Arg]) -> None:
    """Checks beyond the schema: probabilities in range, no sparse gradients, new tensors
    of a size a worker can hold."""
    for key in ("p", "dropout_p"):
        p = values.get(key)
        if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
            raise IRError(f"{where}: {key}={p!r} must be in [0, 1]")
    if values.get("sparse") is True:
        raise IRError(f"{where}: sparse gradients are not supported")
    size = values.get("size")
    if name.split(".")[1] in ("zeros", "ones", "full") and isinstance(size, ListArg):
        dims = [d for d in size.items if isinstance(d, int)]
        if any(not 0 <= d <= _MAX_DIM for d in dims) or math.prod(dims) > _MAX_NEW_ELEMENTS:
            raise IRError(f"{where}: a new tensor of size {list(dims)} is too large")


def check_node(node: Node) -> None:
    """Raise `IRError` unless the node names an allow-listed operator with valid arguments."""
    where = f"node {node.name!r}"
    if node.op == "function":
        if node.target in _PYTHON:
            for arg in (*node.args, *(v for _, v in node.kwargs)):
                if not isinstance(arg, (NodeRef, int, float, bool)) or arg is None:
                    raise IRError(f"{where}: {node.target} works on sizes, not {arg!r}")
            return
        try:
            _check_aten(where, node)
        except IRError as e:
            if str(e).startswith(where):
                raise
            raise IRError(f"{where}: {e}") from None
    elif node.op in ("input", "param") and (node.args or node.kwargs):
        raise IRError(f"{where}: takes no arguments")


def validate_graph(graph: Graph) -> None:
    """Full check of a graph received from anywhere: structure, then every operator (an
    in-place update only on a buffer of the graph)."""
    graph.check_structure()
    specs = graph.param_specs
    for node in graph.nodes:
        check_node(node)
        if node.target in BUFFER_UPDATES:
            first = node.args[0] if node.args else None
            target = graph.node(first.name) if isinstance(first, NodeRef) else None
            if (
                target is None
                or target.op != "param"
                or specs[target.target].trainable
                or graph.consumers[target.name] != (node.name,)
            ):
                raise IRError(
                    f"node {node.name!r}: {node.target} may only update a buffer that no other "
                    "operator reads"
                )


# -- execution -----------------------------------------------------------------------------


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


def _enums(op: torch._ops.OpOverload, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Layouts and memory formats, carried by name, as the objects the operator takes."""
    for i, a in enumerate(op._schema.arguments):
        if _kind(a)[-1] not in ("LayoutType", "MemoryFormatType"):
            continue
        if a.kwarg_only or i >= len(args):
            if isinstance(kwargs.get(a.name), str):
                kwargs[a.name] = ENUMS[kwargs[a.name]]
        elif isinstance(args[i], str):
            args[i] = ENUMS[args[i]]


def call(node: Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Run one validated compute node on resolved arguments."""
    if node.op != "function":
        raise IRError(f"node {node.name!r}: a {node.op} node is not an operator")
    python = _PYTHON.get(node.target)
    if python is not None:
        for value in args:
            if isinstance(value, torch.Tensor) and node.target != "operator.getitem":
                raise IRError(f"node {node.name!r}: {node.target} works on sizes, not tensors")
        if node.target == "operator.getitem" and not isinstance(args[0], (tuple, list)):
            raise IRError(f"node {node.name!r}: getitem reads an operator's tuple of results")
        return python(*args, **kwargs)
    op = overload(node.target)
    _enums(op, args, kwargs)
    return op(*args, **kwargs)


__all__ = [
    "BUFFER_UPDATES",
    "LOCAL_DEVICE",
    "TRAINING_FLAGS",
    "call",
    "check_node",
    "is_allowed",
    "overload",
    "resolve",
    "validate_graph",
]
