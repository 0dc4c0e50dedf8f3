"""The OP-DAG's serialisation boundary: graphs and tensors to protobuf and back.

This is the only module of `opdag` that touches generated protobuf classes (the `.opdag`
file format built on it is `opdag.model_file`). Decoding checks
everything it reads (every tensor's dtype, shape, encoding and byte length agree; every
graph passes the allow-list) and raises `CodecError` naming what is wrong. Nothing is ever
unpickled.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch
from google.protobuf.message import DecodeError

from opdag import ops
from opdag.errors import CodecError, IRError
from opdag.ir import (
    DTYPES,
    LOCAL_DEVICE,
    VALUE_KINDS,
    Arg,
    Costs,
    Graph,
    ListArg,
    LocalDevice,
    Node,
    NodeRef,
    ParamSpec,
    SliceArg,
    ValueMeta,
    dtype_name,
    dtype_of,
)

try:
    from proto import opdag_pb2, tensor_pb2
except ImportError as e:  # pragma: no cover - only before `make proto`
    raise ImportError(
        "the generated protobuf modules are missing; run `make proto` (or `make setup`)"
    ) from e

_INT64 = (-(1 << 63), (1 << 63) - 1)

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("Archipelago's raw tensor encoding assumes a little-endian machine")


# -- arguments -------------------------------------------------------------------------


def _arg_to_pb(arg: Arg, out: opdag_pb2.Arg) -> None:
    if isinstance(arg, NodeRef):
        out.node = arg.name
    elif arg is None:
        out.none = True
    elif isinstance(arg, bool):
        out.bool_value = arg
    elif isinstance(arg, int):
        if not _INT64[0] <= arg <= _INT64[1]:
            raise CodecError(f"integer argument {arg} does not fit in 64 bits")
        out.int_value = arg
    elif isinstance(arg, float):
        out.float_value = arg
    elif isinstance(arg, str):
        out.str_value = arg
    elif isinstance(arg, tuple):
        out.tuple_value.SetInParent()
        for item in arg:
            _arg_to_pb(item, out.tuple_value.items.add())
    elif isinstance(arg, ListArg):
        out.list_value.SetInParent()
        for item in arg.items:
            _arg_to_pb(item, out.list_value.items.add())
    elif isinstance(arg, SliceArg):
        _arg_to_pb(arg.start, out.slice_value.start)
        _arg_to_pb(arg.stop, out.slice_value.stop)
        _arg_to_pb(arg.step, out.slice_value.step)
    elif arg is Ellipsis:
        out.ellipsis = True
    elif isinstance(arg, torch.dtype):
        out.dtype = dtype_name(arg)
    elif isinstance(arg, LocalDevice):
        out.local_device = True
    else:
        raise CodecError(f"cannot encode argument of type {type(arg).__name__}")


def _arg_from_pb(pb: opdag_pb2.Arg, depth: int = 0) -> Arg:
    if depth > 32:
        raise CodecError("argument nesting is deeper than 32 levels")
    kind = pb.WhichOneof("kind")
    if kind == "node":
        return NodeRef(pb.node)
    if kind == "none":
        return None
    if kind == "bool_value":
        return pb.bool_value
    if kind == "int_value":
        return int(pb.int_value)
    if kind == "float_value":
        return float(pb.float_value)
    if kind == "str_value":
        return pb.str_value
    if kind == "tuple_value":
        return tuple(_arg_from_pb(a, depth + 1) for a in pb.tuple_value.items)
    if kind == "list_value":
        return ListArg(tuple(_arg_from_pb(a, depth + 1) for a in pb.list_value.items))
    if kind == "slice_value":
        s = pb.slice_value
        return SliceArg(*(_arg_from_pb(x, depth + 1) for x in (s.start, s.stop, s.step)))
    if kind == "ellipsis":
        return Ellipsis
    if kind == "dtype":
        try:
            return dtype_of(pb.dtype)
        except IRError as e:
            raise CodecError(str(e)) from None
    if kind == "local_device":
        return LOCAL_DEVICE
    raise CodecError("an argument has no value")


def _kwargs_to_pb(items: tuple[tuple[str, Arg], ...], out: object) -> None:
    for name, value in items:
        kw = out.add()  # type: ignore[attr-defined]
        kw.name = name
        _arg_to_pb(value, kw.value)


def _kwargs_from_pb(items: object) -> tuple[tuple[str, Arg], ...]:
    return tuple((kw.name, _arg_from_pb(kw.value)) for kw in items)  # type: ignore[attr-defined]


# -- values, nodes, graphs -----------------------------------------------------------------


def _meta_to_pb(meta: ValueMeta, out: opdag_pb2.ValueMeta) -> None:
    out.kind = meta.kind
    out.shape.extend(meta.shape)
    out.dtype = meta.dtype
    out.requires_grad = meta.requires_grad
    for item in meta.items:
        _meta_to_pb(item, out.items.add())


def _meta_from_pb(pb: opdag_pb2.ValueMeta, depth: int = 0) -> ValueMeta:
    if depth > 32:
        raise CodecError("value description nesting is deeper than 32 levels")
    # Partitioning and transfers size edges from these; a bogus one must not get that far.
    if pb.kind not in VALUE_KINDS:
        raise CodecError(f"unknown value kind {pb.kind!r} (known: {', '.join(VALUE_KINDS)})")
    if pb.kind == "tensor" and pb.dtype not in DTYPES:
        raise CodecError(f"a tensor value has unknown dtype {pb.dtype!r}")
    if any(d < 0 for d in pb.shape):
        raise CodecError(f"a value has a negative dimension {list(pb.shape)}")
    return ValueMeta(
        kind=pb.kind,
        shape=tuple(pb.shape),
        dtype=pb.dtype,
        requires_grad=pb.requires_grad,
        items=tuple(_meta_from_pb(i, depth + 1) for i in pb.items),
    )


def graph_to_pb(graph: Graph) -> opdag_pb2.Graph:
    pb = opdag_pb2.Graph(
        ir_version=graph.ir_version,
        name=graph.name,
        inputs=graph.inputs,
        outputs=graph.outputs,
        loss=graph.loss,
        example_batch=graph.example_batch,
        fixed_batch=not graph.dynamic_batch,
    )
    for key, param in graph.state_keys:
        pb.state_keys.add(key=key, param=param)
    for p in graph.params:
        pb.params.add(name=p.name, shape=p.shape, dtype=p.dtype, trainable=p.trainable)
    for node in graph.nodes:
        npb = pb.nodes.add(name=node.name, op=node.op, target=node.target, source=node.source)
        for arg in node.args:
            _arg_to_pb(arg, npb.args.add())
        _kwargs_to_pb(node.kwargs, npb.kwargs)
        if node.meta is not None:
            _meta_to_pb(node.meta, npb.meta)
        if node.costs is not None:
            c = node.costs
            npb.costs.SetInParent()
            npb.costs.fwd_flops = c.fwd_flops
            npb.costs.bwd_flops = c.bwd_flops
            npb.costs.param_bytes = c.param_bytes
            npb.costs.out_bytes = c.out_bytes
    return pb


def graph_from_pb(pb: opdag_pb2.Graph) -> Graph:
    """Decode and fully validate a graph (structure and allow-list)."""
    nodes = []
    for npb in pb.nodes:
        try:
            nodes.append(_node_from_pb(npb))
        except CodecError as e:
            raise CodecError(f"node {npb.name!r} ({npb.op} {npb.target}): {e}") from None
    graph = Graph(
        name=pb.name,
        nodes=tuple(nodes),
        inputs=tuple(pb.inputs),
        outputs=tuple(pb.outputs),
        loss=pb.loss,
        params=tuple(ParamSpec(p.name, tuple(p.shape), p.dtype, p.trainable) for p in pb.params),
        example_batch=pb.example_batch,
        state_keys=tuple((k.key, k.param) for k in pb.state_keys),
        dynamic_batch=not pb.fixed_batch,
        ir_version=pb.ir_version,
    )
    try:
        ops.validate_graph(graph)
    except IRError as e:
        raise CodecError(f"invalid graph: {e}") from None
    return graph


def _node_from_pb(npb: opdag_pb2.Node) -> Node:
    costs = None
    if npb.HasField("costs"):
        c = npb.costs
        costs = Costs(c.fwd_flops, c.bwd_flops, c.param_bytes, c.out_bytes)
    return Node(
        name=npb.name,
        op=npb.op,
        target=npb.target,
        args=tuple(_arg_from_pb(a) for a in npb.args),
        kwargs=_kwargs_from_pb(npb.kwargs),
        meta=_meta_from_pb(npb.meta) if npb.HasField("meta") else None,
        costs=costs,
        source=npb.source,
    )


def encode_graph(graph: Graph) -> bytes:
    return graph_to_pb(graph).SerializeToString(deterministic=True)


def decode_graph(data: bytes) -> Graph:
    try:
        pb = opdag_pb2.Graph.FromString(data)
    except DecodeError as e:
        raise CodecError(f"graph message is corrupt: {e}") from None
    return graph_from_pb(pb)


# -- tensors -----------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, row-major (one copy)."""
    t = t.detach().cpu().contiguous()
    nbytes = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""


def tensor_to_pb(name: str, t: torch.Tensor) -> tensor_pb2.Tensor:
    data = tensor_bytes(t)
    t = t.detach()
    return tensor_pb2.Tensor(
        name=name,
        dtype=dtype_name(t.dtype),
        shape=tuple(t.shape),
        encoding="raw",
        nbytes=len(data),
        data=data,
    )


def tensor_from_pb(pb: tensor_pb2.Tensor) -> tuple[str, torch.Tensor]:
    """Decode a raw tensor after checking its description against its bytes."""
    what = f"tensor {pb.name!r}"
    if pb.dtype not in DTYPES:
        raise CodecError(f"{what}: unknown dtype {pb.dtype!r} (supported: {', '.join(DTYPES)})")
    if pb.encoding != "raw":
        raise CodecError(f"{what}: unknown encoding {pb.encoding!r} (expected 'raw')")
    if len(pb.shape) > 16 or any(d < 0 for d in pb.shape):
        raise CodecError(f"{what}: invalid shape {list(pb.shape)}")
    dtype = DTYPES[pb.dtype]
    expected = math.prod(pb.shape) * dtype.itemsize
    if pb.nbytes != expected or len(pb.data) != expected:
        raise CodecError(
            f"{what}: {pb.dtype}{list(pb.shape)} needs {expected} bytes; header says "
            f"{pb.nbytes}, data has {len(pb.data)}"
        )
    if expected == 0:
        try:
            return pb.name, torch.empty(tuple(pb.shape), dtype=dtype)
        except RuntimeError as e:  # an empty shape whose other dimensions overflow
            raise CodecError(f"{what}: invalid shape {list(pb.shape)}: {e}") from None
    flat = torch.frombuffer(bytearray(pb.data), dtype=torch.uint8)
    # A bool byte other than 0 or 1 is not a bool: torch would keep it, and sum it as 2.
    if dtype == torch.bool and bool((flat > 1).any()):
        raise CodecError(f"{what}: a bool tensor holds bytes other than 0 and 1")
    return pb.name, flat.view(dtype).reshape(tuple(pb.shape))


def encode_tensor(name: str, t: torch.Tensor) -> bytes:
    return tensor_to_pb(name, t).SerializeToString(deterministic=True)


def decode_tensor(data: bytes) -> tuple[str, torch.Tensor]:
    try:
        pb = tensor_pb2.Tensor.FromString(data)
    except DecodeError as e:
        raise CodecError(f"tensor message is corrupt: {e}") from None
    return tensor_from_pb(pb)
