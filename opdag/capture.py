"""Capture a `torch.nn.Module` as an OP-DAG with `torch.export`, PyTorch's whole-graph capture.

The model's forward runs once on fake tensors shaped like the example inputs; what it does
with shapes and configuration (asserts on sizes, masks and positions built from shapes, `if`
on config values) is settled there, and what is left is a graph of ATen operators. Each
operator is mapped onto the allow-list (`opdag.ops`), each parameter, buffer and constant
becomes a named tensor beside the graph. The batch dimension stays symbolic when the model
allows it, so one graph runs any micro-batch size; a model whose code fixes it is captured
for the example batch alone.

A parameter used in several places (tied input and output embeddings) is one parameter of
the graph, read by every node that uses it; `Graph.state_keys` keeps each of the module's
own `state_dict` keys, so the trained tensors go back under the names the module expects.

A model whose forward returns its scalar training loss captures as a training graph whose
`loss` output starts the backward pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim, ExportedProgram, export
from torch.export.graph_signature import InputKind, OutputKind

from opdag import ops
from opdag.costs import annotate
from opdag.errors import CaptureError, IRError
from opdag.ir import (
    LOCAL_DEVICE,
    Arg,
    CapturedModel,
    Graph,
    ListArg,
    Node,
    NodeRef,
    ParamSpec,
    dtype_name,
)

_TORCH_DIR = os.path.dirname(torch.__file__)

# Checks torch.export records for itself (a tensor's dtype, a size's range): they guard
# the capture, not the computation, and are dropped.
_CAPTURE_CHECKS = frozenset(
    {
        "aten._assert_tensor_metadata.default",
        "aten._assert_scalar.default",
        "aten._assert_async.msg",
        "aten.sym_constrain_range_for_size.default",
        "aten.sym_constrain_range.default",
    }
)
# In-place forms torch.export leaves on fresh tensors, kept as their out-of-place twins.
_OUT_OF_PLACE = {"aten.detach_.default": "aten.detach.default"}
_PYTHON_MODULES = {"_operator": "operator", "operator": "operator", "math": "math"}


def capture(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    name: str | None = None,
) -> CapturedModel:
    """Export `model` into an OP-DAG, with shapes and costs measured for `example_inputs`.

    `example_inputs` maps the forward's argument names to example tensors (meta tensors are
    enough: only shapes and dtypes are used). Raises `CaptureError` naming what cannot be
    captured: code torch.export cannot follow, or every operator outside the allow-list and
    where it is in the model.
    """
    graph_name = name or type(model).__name__
    example = dict(example_inputs)
    batch = next((int(t.shape[0]) for t in example.values() if t.dim() > 0), 0)
    program, dynamic = _export(model, example, batch, graph_name)
    nodes, params, state, outputs, state_keys = _convert(program, model, example, graph_name)
    graph = Graph(
        name=graph_name,
        nodes=tuple(nodes),
        inputs=tuple(n.name for n in nodes if n.op == "input"),
        outputs=outputs,
        loss="",
        params=tuple(params),
        example_batch=batch,
        state_keys=state_keys,
        dynamic_batch=dynamic,
    )
    try:
        graph.check_structure()
        graph = annotate(graph, {k: v.to("meta") for k, v in example.items()})
    except IRError as e:
        raise CaptureError(f"{graph_name}: {e}") from e
    graph = _mark_loss(graph)
    return CapturedModel(graph=graph, state=state)


# -- export --------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _concrete(example: Mapping[str, torch.Tensor], device: torch.device, batch: int) -> dict:
    """Example inputs on the model's device (zeros: only shapes and dtypes matter), with
    `batch` rows where the example has its batch dimension."""
    out = {}
    for key, t in example.items():
        shape = list(t.shape)
        if shape and shape[0] == example_batch_of(example):
            shape[0] = batch
        out[key] = torch.zeros(shape, dtype=t.dtype, device=device)
    return out


def example_batch_of(example: Mapping[str, torch.Tensor]) -> int:
    return next((int(t.shape[0]) for t in example.values() if t.dim() > 0), 0)


def _export(
    model: nn.Module, example: Mapping[str, torch.Tensor], batch: int, graph_name: str
) -> tuple[ExportedProgram, bool]:
    """The exported program, with a symbolic batch when the model allows one."""
    device = _device_of(model)
    was_training = model.training
    model.train()  # captured for training; dropout and batch norm follow the stage's mode
    try:
        if batch > 0:
            # torch.export fixes sizes 0 and 1, so a symbolic batch is traced with two rows.
            traced = _concrete(example, device, max(batch, 2))
            dim = Dim("batch", min=1, max=1 << 20)
            dynamic = {
                k: ({0: dim} if t.dim() > 0 and t.shape[0] == max(batch, 2) else None)
                for k, t in traced.items()
            }
            try:
                return _run_export(model, traced, dynamic), True
            except CaptureError:
                raise
            except Exception as e:
                if "specialized" not in str(e) and "Constraints violated" not in str(e):
                    raise _export_error(model, graph_name, e) from e
        try:
            return _run_export(model, _concrete(example, device, batch), None), False
        except CaptureError:
            raise
        except Exception as e:
            raise _export_error(model, graph_name, e) from e
    finally:
        model.train(was_training)


def _run_export(
    model: nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict | None
) -> ExportedProgram:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return export(model, (), kwargs=inputs, dynamic_shapes=dynamic, strict=False)
        except TypeError as e:
            if "argument" in str(e) and "forward" not in str(e):
                raise
            raise CaptureError(
                f"the example inputs {sorted(inputs)} do not match the forward's arguments: {e}"
            ) from e


def _export_error(model: nn.Module, graph_name: str, e: Exception) -> CaptureError:
    first = (str(e).strip().splitlines() or [""])[0][:400]
    hint = ""
    if "data-dependent" in str(e) or "guard" in str(e).lower():
        hint = (
            ". Capture follows shapes and configuration, not tensor values: no if/for on "
            "tensor contents, no .item()"
        )
    return CaptureError(
        f"{graph_name}: cannot capture {type(model).__name__}: {type(e).__name__}: {first}{hint}"
    )


# -- conversion ----------------------------------------------------------------------------

_Converted = tuple[
    list[Node],
    list[ParamSpec],
    dict[str, torch.Tensor],
    tuple[str, ...],
    tuple[tuple[str, str], ...],
]


def _canonical_names(model: nn.Module) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Each parameter and buffer name to the first name of the same tensor (tied weights
    share one), and the tensor of each name."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for qualname, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        canonical[qualname] = first.setdefault(id(t), qualname)
        tensors[qualname] = t
    return canonical, tensors


def _convert(
    program: ExportedProgram,
    model: nn.Module,
    example: Mapping[str, torch.Tensor],
    graph_name: str,
) -> _Converted:
    """Map each node of the exported program onto the IR and the allow-list."""
    canonical, tensors = _canonical_names(model)
    specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, "name")}
    nodes: list[Node] = []
    params: list[ParamSpec] = []
    state: dict[str, torch.Tensor] = {}
    param_node: dict[str, str] = {}  # parameter name -> the node that reads it
    rename: dict[str, str] = {}  # exported node -> the node standing for it
    refused: list[str] = []
    outputs: tuple[str, ...] = ()

    for fx_node in program.graph.nodes:
        source = _source(fx_node)
        where = f"{fx_node.name} at {source}"
        if fx_node.op == "placeholder":
            spec = specs.get(fx_node.name)
            if spec is None or spec.kind == InputKind.USER_INPUT:
                if fx_node.name not in example:
                    raise CaptureError(f"no example given for input {fx_node.name!r}")
                nodes.append(Node(fx_node.name, "input", fx_node.name, source=source))
                continue
            if not fx_node.users:
                continue  # the second name of a tied weight, or a tensor the forward ignores
            qualname, t, trainable = _placeholder_tensor(program, spec, canonical, tensors)
            if qualname in param_node:
                rename[fx_node.name] = param_node[qualname]  # a tied weight, read again
                continue
            param_node[qualname] = fx_node.name
            state[qualname] = t.detach().cpu().contiguous().clone()
            params.append(ParamSpec(qualname, tuple(t.shape), dtype_name(t.dtype), trainable))
            nodes.append(Node(fx_node.name, "param", qualname, source=source))
        elif fx_node.op == "call_function":
            target = _operator_name(fx_node.target)
            if target in _CAPTURE_CHECKS and not fx_node.users:
                continue
            target = _OUT_OF_PLACE.get(target, target)
            args = tuple(_convert_arg(a, where, rename) for a in fx_node.args)
            kwargs = tuple((k, _convert_arg(v, where, rename)) for k, v in fx_node.kwargs.items())
            written = _written(target, args, nodes, specs_of=params)
            if written is not None:
                # An in-place operator on a value this graph made (`relu(inplace=True)`,
                # `h += x`) becomes its out-of-place twin, and every later reader of the
                # value reads the twin's result: the same computation, no write.
                target = _out_of_place(target, where, written, nodes)
                rename[written] = fx_node.name
            if not ops.is_allowed(target):
                refused.append(f"{target} at {source}")
                continue
            nodes.append(Node(fx_node.name, "function", target, args, kwargs, source=source))
        elif fx_node.op == "output":
            outputs = _output_names(program, fx_node, where, rename)
        else:
            refused.append(f"{fx_node.op} {fx_node.target} at {source}")

    if refused:
        listing = "\n  ".join(dict.fromkeys(refused))
        raise CaptureError(
            f"{graph_name}: {len(dict.fromkeys(refused))} operator(s) outside the allow-list:\n"
            f"  {listing}\n(see `opdag.ops` for what workers may run)"
        )
    for node in nodes:
        try:
            ops.check_node(node)
        except IRError as e:
            raise CaptureError(f"{node.name} at {node.source}: {e}") from None
    state_keys = tuple(
        (key, canonical[key])
        for key in model.state_dict(keep_vars=True)
        if canonical.get(key) in state
    )
    return nodes, params, state, outputs, state_keys


def _written(
    target: str, args: tuple[Arg, ...], nodes: list[Node], *, specs_of: list[ParamSpec]
) -> str | None:
    """The node whose value an in-place operator writes into, or None when the operator is
    not in-place (or is a buffer update the allow-list keeps as it is)."""
    parts = target.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not hasattr(torch.ops.aten, parts[1]):
        return None
    packet = getattr(torch.ops.aten, parts[1])
    if parts[2] not in packet.overloads():
        return None
    schema = getattr(packet, parts[2])._schema
    alias = schema.arguments[0].alias_info if schema.arguments else None
    if alias is None or not alias.is_write or not parts[1].endswith("_"):
        return None
    first = args[0] if args else None
    if not isinstance(first, NodeRef):
        return None
    if target in ops.BUFFER_UPDATES:
        reads = {n.name: n for n in nodes if n.op == "param"}
        buffers = {p.name for p in specs_of if not p.trainable}
        if first.name in reads and reads[first.name].target in buffers:
            return None
    return first.name


def _out_of_place(target: str, where: str, written: str, nodes: list[Node]) -> str:
    """The out-of-place twin of an in-place operator writing into the value of `written`,
    which must be a fresh value of this graph (not an input, a parameter or a view)."""
    _, packet, which = target.split(".")
    producer = next((n for n in reversed(nodes) if n.name == written), None)
    if producer is None or producer.op != "function":
        is_input = producer is not None and producer.op == "input"
        what = "an input" if is_input else "a parameter or buffer"
        raise CaptureError(f"{where}: {target} writes into {what} ({written}); write a copy")
    if producer.target.startswith("aten."):
        returns = ops.overload(producer.target)._schema.returns
        if any(r.alias_info is not None for r in returns):
            raise CaptureError(
                f"{where}: {target} writes into a view ({written}, from {producer.target}); "
                "write into a copy instead"
            )
    return f"aten.{packet[:-1]}.{which}"


def _placeholder_tensor(
    program: ExportedProgram,
    spec: Any,
    canonical: Mapping[str, str],
    tensors: Mapping[str, torch.Tensor],
) -> tuple[str, torch.Tensor, bool]:
    """The name, tensor and trainability of a parameter, buffer or constant placeholder."""
    target = str(spec.target)
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and target in canonical:
        qualname = canonical[target]
        t = tensors[qualname]
        return qualname, t, isinstance(t, nn.Parameter) and t.requires_grad
    if spec.kind == InputKind.CONSTANT_TENSOR and target in program.constants:
        t = program.constants[target]
        if isinstance(t, torch.Tensor):
            return target, t, False  # a tensor the forward makes from constants
    raise CaptureError(f"input {spec.arg.name!r} ({spec.kind.name} {target!r}) is not a tensor")


def _operator_name(fn: Any) -> str:
    """The name a node gives its operator: `aten.linear.default`, `operator.mul`."""
    if isinstance(fn, torch._ops.OpOverload):
        return str(fn)
    module = getattr(fn, "__module__", None) or ""
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    if module in _PYTHON_MODULES:
        return f"{_PYTHON_MODULES[module]}.{qual}"
    if fn in (torch.sym_max, torch.sym_min, torch.sym_float, torch.sym_int):
        return f"torch.{fn.__name__}"
    return f"{module}.{qual}" if module else str(qual)


def _convert_arg(value: Any, where: str, rename: Mapping[str, str]) -> Arg:
    if isinstance(value, fx.Node):
        return NodeRef(rename.get(value.name, value.name))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        dtype_name(value)  # refuses dtypes the wire cannot carry
        return value
    if isinstance(value, torch.device):
        return LOCAL_DEVICE
    if isinstance(value, torch.layout):
        if value != torch.strided:
            raise CaptureError(f"{where}: only strided (dense) tensors are supported")
        return "strided"
    if isinstance(value, torch.memory_format):
        for enum_name, enum in ops.ENUMS.items():
            if enum == value:
                return enum_name
        raise CaptureError(f"{where}: memory format {value} is not supported")
    if isinstance(value, list):
        return ListArg(tuple(_convert_arg(v, where, rename) for v in value))
    if isinstance(value, tuple):
        return tuple(_convert_arg(v, where, rename) for v in value)
    raise CaptureError(
        f"{where}: argument of type {type(value).__name__} ({value!r:.60}) cannot be part of a "
        "graph (allowed: tensors from other nodes, numbers, strings, dtypes, lists)"
    )


def _output_names(
    program: ExportedProgram, node: fx.Node, where: str, rename: Mapping[str, str]
) -> tuple[str, ...]:
    for spec in program.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise CaptureError(
                f"{where}: the forward changes its {spec.kind.name.lower().replace('_', ' ')} "
                f"{spec.target!r} outside an allow-listed operator"
            )
    values: Any = node.args[0]
    if isinstance(values, fx.Node):
        values = (values,)
    if isinstance(values, (tuple, list)) and values and all(isinstance(v, fx.Node) for v in values):
        return tuple(rename.get(str(v.name), str(v.name)) for v in values)
    raise CaptureError(f"{where}: the model must return a tensor or a tuple of tensors")


def _source(node: fx.Node) -> str:
    """Where a node comes from: the module path and the innermost line of user code."""
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = str(list(stack.values())[-1][0])
        for prefix in ("L['self'].", "L['self']"):
            path = path.removeprefix(prefix)
    path = path or "<root>"
    line = ""
    for text in (node.meta.get("stack_trace") or "").split("\n"):
        text = text.strip()
        # The innermost frame of the user's code, not torch's.
        if text.startswith("File ") and _TORCH_DIR not in text:
            # 'File "/x/model.py", line 16, in forward'
            parts = [p.strip() for p in text.split(",")]
            if len(parts) >= 3:
                file = os.path.basename(parts[0][6:-1])
                lineno = parts[1].removeprefix("line ")
                line = f"{file}:{lineno} in {parts[2].removeprefix('in ')}"
    return f"{path} ({line})" if line else path


def _mark_loss(graph: Graph) -> Graph:
    """The first output is the training loss when it is a scalar floating-point tensor."""
    first = graph.node(graph.outputs[0]).meta if graph.outputs else None
    if (
        first is not None
        and first.kind == "tensor"
        and first.shape == ()
        and first.dtype.startswith(("float", "bfloat"))
        and first.requires_grad
    ):
        return replace(graph, loss=graph.outputs[0])
    return graph


__all__ = ["capture"]
