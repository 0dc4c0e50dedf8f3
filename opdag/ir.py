"""The OP-DAG intermediate representation: a model as a graph of operators.

A `Graph` is a list of `Node`s in topological order; each node is an input, a read of a
parameter or buffer, or one allow-listed (ATen) operator, and refers to the values of
earlier nodes through `NodeRef` arguments. Parameters are described by `ParamSpec`s and
travel as named tensors beside the graph; a parameter the model uses in several places (tied
weights) is one parameter read by several nodes. Everything here
is plain, frozen data: printable, comparable and serialisable by `opdag.graph_serde`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import EllipsisType
from typing import TypeAlias

import torch

from opdag.errors import IRError
from proto.dtypes import DTYPE_NAMES, DTYPES

# Version 2: ATen operators captured by torch.export (version 1 held fx modules and methods).
IR_VERSION = 2

# The dtypes a graph may carry are the one table in proto.dtypes; these name them for the IR.


def dtype_name(dtype: torch.dtype) -> str:
    """The stable name of a supported dtype."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise IRError(f"dtype {dtype} is not supported (supported: {', '.join(DTYPES)})") from None


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a stable dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise IRError(f"unknown dtype {name!r} (supported: {', '.join(DTYPES)})") from None


def itemsize(name: str) -> int:
    return dtype_of(name).itemsize


# -- arguments -------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRef:
    """An argument that is the value produced by another node."""

    name: str


@dataclass(frozen=True)
class ListArg:
    """A Python list argument (kept apart from tuples so the rebuilt call is the same)."""

    items: tuple[Arg, ...]


@dataclass(frozen=True)
class SliceArg:
    """A slice argument, as in `x[:, :T]`."""

    start: Arg
    stop: Arg
    step: Arg


@dataclass(frozen=True)
class LocalDevice:
    """The device the stage runs on, standing in for any device constant in the model."""


LOCAL_DEVICE = LocalDevice()

# What an operator argument may be: plain data, never an object with behaviour.
Arg: TypeAlias = (
    bool
    | int
    | float
    | str
    | tuple["Arg", ...]
    | ListArg
    | SliceArg
    | EllipsisType
    | torch.dtype
    | NodeRef
    | LocalDevice
    | None
)


def iter_refs(arg: Arg) -> Iterator[str]:
    """The names of the nodes an argument refers to, in order."""
    if isinstance(arg, NodeRef):
        yield arg.name
    elif isinstance(arg, tuple):
        for item in arg:
            yield from iter_refs(item)
    elif isinstance(arg, ListArg):
        for item in arg.items:
            yield from iter_refs(item)
    elif isinstance(arg, SliceArg):
        for item in (arg.start, arg.stop, arg.step):
            yield from iter_refs(item)


def format_arg(arg: Arg) -> str:
    """A short human-readable rendering of an argument."""
    if isinstance(arg, NodeRef):
        return f"%{arg.name}"
    if isinstance(arg, tuple):
        inner = ", ".join(format_arg(a) for a in arg)
        return f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, ListArg):
        return "[" + ", ".join(format_arg(a) for a in arg.items) + "]"
    if isinstance(arg, SliceArg):
        parts = ["" if p is None else format_arg(p) for p in (arg.start, arg.stop, arg.step)]
        return ":".join(parts[:2]) if arg.step is None else ":".join(parts)
    if arg is Ellipsis:
        return "..."
    if isinstance(arg, torch.dtype):
        return dtype_name(arg)
    if isinstance(arg, LocalDevice):
        return "<device>"
    return repr(arg)


# -- values ----------------------------------------------------------------------------

VALUE_KINDS = ("tensor", "int", "float", "bool", "none", "dtype", "device", "tuple", "list")


@dataclass(frozen=True)
class ValueMeta:
    """What a node produces: a tensor (shape, dtype, whether it carries gradient), a Python
    scalar, or a tuple/list of those."""

    kind: str
    shape: tuple[int, ...] = ()
    dtype: str = ""
    requires_grad: bool = False
    items: tuple[ValueMeta, ...] = ()

    @property
    def nbytes(self) -> int:
        """Bytes this value takes on the wire, uncompressed."""
        if self.kind == "tensor":
            return math.prod(self.shape) * itemsize(self.dtype)
        if self.kind in ("tuple", "list"):
            return sum(item.nbytes for item in self.items)
        if self.kind in ("int", "float"):
            return 8
        return 1

    @property
    def carries_grad(self) -> bool:
        """Whether a gradient flows back through this value."""
        if self.kind == "tensor":
            return self.requires_grad
        return any(item.carries_grad for item in self.items)

    def describe(self) -> str:
        if self.kind == "tensor":
            return f"{self.dtype}[{','.join(map(str, self.shape))}]"
        if self.kind in ("tuple", "list"):
            open_, close = ("(", ")") if self.kind == "tuple" else ("[", "]")
            return open_ + ", ".join(item.describe() for item in self.items) + close
        return self.kind


def tensor_meta(shape: tuple[int, ...], dtype: str, requires_grad: bool = False) -> ValueMeta:
    return ValueMeta(kind="tensor", shape=tuple(shape), dtype=dtype, requires_grad=requires_grad)


# -- nodes and graphs --------------------------------------------------------------------

OP_KINDS = ("input", "param", "function")


@dataclass(frozen=True)
class Costs:
    """Measured cost of one node for the graph's example batch."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    param_bytes: int = 0
    out_bytes: int = 0


@dataclass(frozen=True)
class Node:
    """One operator of the graph.

    `op` is one of `OP_KINDS`; `target` is the input's name, the parameter's qualified name
    or the operator's name (`aten.linear.default`, `operator.mul`). `source` says where in
    the user's model the node comes from (module path and line).
    """

    name: str
    op: str
    target: str
    args: tuple[Arg, ...] = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()
    meta: ValueMeta | None = None
    costs: Costs | None = None
    source: str = ""

    def refs(self) -> Iterator[str]:
        """Names of the nodes whose values this node reads (with repeats)."""
        for arg in self.args:
            yield from iter_refs(arg)
        for _, arg in self.kwargs:
            yield from iter_refs(arg)

    def describe(self) -> str:
        """One line, as in a printed program: `name = op target(args)`."""
        args = [format_arg(a) for a in self.args]
        args += [f"{k}={format_arg(v)}" for k, v in self.kwargs]
        out = f" -> {self.meta.describe()}" if self.meta is not None else ""
        return f"{self.name} = {self.op} {self.target}({', '.join(args)}){out}"


@dataclass(frozen=True)
class ParamSpec:
    """A parameter or buffer of the model: its qualified name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,199}$")


@dataclass(frozen=True)
class Graph:
    """A model (or one stage of it) as operators in topological order."""

    name: str
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    loss: str = ""
    params: tuple[ParamSpec, ...] = ()
    example_batch: int = 0
    # The user's module's `state_dict` keys and the parameter each one is (a tied weight is
    # one parameter under several keys): how a trained graph is handed back as the model's own
    # state. Empty for a graph not captured from a module.
    state_keys: tuple[tuple[str, str], ...] = ()
    # Whether the graph runs any batch size (captured with a dynamic batch dimension) or
    # only `example_batch`.
    dynamic_batch: bool = True
    ir_version: int = IR_VERSION
    # Lookups derived from the fields above; not part of equality.
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update((n.name, i) for i, n in enumerate(self.nodes))

    # lookups

    def node(self, name: str) -> Node:
        try:
            return self.nodes[self._index[name]]
        except KeyError:
            raise IRError(f"graph {self.name!r} has no node {name!r}") from None

    def position(self, name: str) -> int:
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @functools.cached_property
    def consumers(self) -> Mapping[str, tuple[str, ...]]:
        """For each node, the nodes that read its value (each once, in graph order)."""
        users: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for ref in dict.fromkeys(n.refs()):
                if ref in users:
                    users[ref].append(n.name)
        return {k: tuple(v) for k, v in users.items()}

    @functools.cached_property
    def param_specs(self) -> Mapping[str, ParamSpec]:
        return {p.name: p for p in self.params}

    def owned_params(self, node: Node) -> tuple[str, ...]:
        """The parameters and buffers a node reads directly (a param node's own)."""
        if node.op == "param":
            return (node.target,)
        return ()

    @property
    def compute_nodes(self) -> tuple[Node, ...]:
        """Nodes that run an operator (not inputs or parameter reads)."""
        return tuple(n for n in self.nodes if n.op == "function")

    def with_nodes(self, nodes: tuple[Node, ...]) -> Graph:
        return replace(self, nodes=nodes)

    # checks

    def check_structure(self) -> None:
        """Raise `IRError` unless the graph is well formed: unique names, references only to
        earlier nodes (so it is acyclic), inputs/outputs/params consistent."""
        if self.ir_version != IR_VERSION:
            raise IRError(
                f"graph {self.name!r} has IR version {self.ir_version}; "
                f"this Archipelago reads version {IR_VERSION}"
            )
        seen: set[str] = set()
        specs = self.param_specs
        if len(specs) != len(self.params):
            raise IRError(f"graph {self.name!r} lists a parameter twice")
        for p in self.params:
            if not _NAME_RE.match(p.name):
                raise IRError(f"parameter name {p.name!r} is not a valid qualified name")
            if any(d < 0 for d in p.shape):
                raise IRError(f"parameter {p.name!r} has a negative dimension {p.shape}")
            dtype_of(p.dtype)
        for i, n in enumerate(self.nodes):
            where = f"node {i} ({n.name!r})"
            if not _NAME_RE.match(n.name) or "." in n.name:
                raise IRError(f"{where}: name is not a valid identifier")
            if n.name in seen:
                raise IRError(f"{where}: the name is used by an earlier node too")
            if n.op not in OP_KINDS:
                raise IRError(f"{where}: unknown node kind {n.op!r} (known: {', '.join(OP_KINDS)})")
            for ref in n.refs():
                if ref not in seen:
                    why = "a later node (cycle?)" if ref in self._index else "no node"
                    raise IRError(f"{where}: argument %{ref} refers to {why}")
            if n.op == "input" and (n.args or n.kwargs):
                raise IRError(f"{where}: an input takes no arguments")
            if n.op == "param" and n.target not in specs:
                raise IRError(f"{where}: reads parameter {n.target!r}, which is not declared")
            seen.add(n.name)
        inputs = [n.name for n in self.nodes if n.op == "input"]
        if list(self.inputs) != inputs:
            raise IRError(
                f"graph {self.name!r}: declared inputs {list(self.inputs)} differ from its "
                f"input nodes {inputs}"
            )
        for out in self.outputs:
            if out not in seen:
                raise IRError(f"graph {self.name!r}: output {out!r} is not a node")
        if self.loss and self.loss not in self.outputs:
            raise IRError(f"graph {self.name!r}: loss {self.loss!r} is not among its outputs")
        used = {p for n in self.nodes for p in self.owned_params(n)}
        unused = [p.name for p in self.params if p.name not in used]
        if unused:
            raise IRError(f"graph {self.name!r}: parameters {unused[:5]} belong to no node")
        keys = [k for k, _ in self.state_keys]
        if len(set(keys)) != len(keys):
            raise IRError(f"graph {self.name!r}: a state key is listed twice")
        for key, param in self.state_keys:
            if not _NAME_RE.match(key) or param not in specs:
                raise IRError(
                    f"graph {self.name!r}: state key {key!r} names parameter {param!r}, "
                    "which is not declared"
                )

    # summaries

    def total(self, attr: str) -> float:
        return sum(getattr(n.costs, attr) for n in self.nodes if n.costs is not None)

    def num_params(self, *, trainable_only: bool = True) -> int:
        return sum(math.prod(p.shape) for p in self.params if p.trainable or not trainable_only)

    def describe(self) -> str:
        """The graph as a readable program listing."""
        lines = [f"graph {self.name}({', '.join(self.inputs)}):"]
        lines += [f"  {n.describe()}" for n in self.nodes if n.op != "input"]
        lines.append(
            f"  return {', '.join(self.outputs)}" + (f"  # loss: {self.loss}" if self.loss else "")
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class CapturedModel:
    """A captured model: its graph and the tensors of its parameters and buffers by name."""

    graph: Graph
    state: Mapping[str, torch.Tensor]
