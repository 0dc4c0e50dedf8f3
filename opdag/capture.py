"""Capture a `torch.nn.Module` as an OP-DAG: trace it with torch.fx, map every operator onto
the allow-list, and keep its parameters as named tensors beside the graph.

A model whose forward returns its scalar training loss captures as a training graph whose
`loss` output starts the backward pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

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
    SliceArg,
    dtype_name,
)

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Tracer(fx.Tracer):
    """fx tracer that stops at allow-listed modules and remembers where each node came from."""

    def __init__(self, *, record_stack_traces: bool) -> None:
        super().__init__()
        # Source lines cost a third of a capture; they are recorded only to locate an
        # operator that capture refuses.
        self.record_stack_traces = record_stack_traces
        self._paths: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in ops.MODULE_CLASSES:
            return True
        # Other torch.nn modules stay whole so capture can name them, instead of failing on
        # whatever their internals do.
        from_torch = type(m).__module__.startswith("torch.nn")
        return from_torch and not isinstance(m, _CONTAINERS)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        self._paths.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._paths.pop()

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["archipelago_module"] = self._paths[-1] if self._paths else ""
        return node


def _source(node: fx.Node) -> str:
    """Where a node comes from: the module path and the innermost line of user code."""
    path = node.meta.get("archipelago_module", "") or "<root>"
    if node.op == "call_module":
        path = str(node.target)
    line = ""
    frames = (node.stack_trace or "").split("\n")
    for text in frames:
        text = text.strip()
        # The innermost frame of the user's code: not torch's, not this module's tracer.
        if text.startswith("File ") and _TORCH_DIR not in text and _THIS_FILE not in text:
            # 'File "/x/model.py", line 16, in forward'
            parts = [p.strip() for p in text.split(",")]
            if len(parts) >= 3:
                file = os.path.basename(parts[0][6:-1])
                lineno = parts[1].removeprefix("line ")
                line = f"{file}:{lineno} in {parts[2].removeprefix('in ')}"
    return f"{path} ({line})" if line else path


def _convert_arg(value: Any, where: str) -> Arg:
    if isinstance(value, fx.Node):
        return NodeRef(value.name)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if value is Ellipsis:
        return Ellipsis
    if isinstance(value, torch.dtype):
        dtype_name(value)  # refuses dtypes the wire cannot carry
        return value
    if isinstance(value, torch.device):
        return LOCAL_DEVICE
    if isinstance(value, slice):
        return SliceArg(*(_convert_arg(v, where) for v in (value.start, value.stop, value.step)))
    if isinstance(value, list):
        return ListArg(tuple(_convert_arg(v, where) for v in value))
    if isinstance(value, tuple):  # includes torch.Size
        return tuple(_convert_arg(v, where) for v in value)
    raise CaptureError(
        f"{where}: argument of type {type(value).__name__} ({value!r:.60}) cannot be part of a "
        "graph (allowed: tensors from other nodes, numbers, strings, dtypes, slices, tuples)"
    )


def _check_untied(model: nn.Module) -> None:
    seen: dict[int, str] = {}
    for name, t in (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ):
        first = seen.setdefault(id(t), name)
        if first != name:
            raise CaptureError(
                f"parameters {first!r} and {name!r} are the same tensor (tied weights); "
                "untie them: each parameter of a captured model must belong to one place"
            )


def capture(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    name: str | None = None,
) -> CapturedModel:
    """Trace `model` into an OP-DAG, with shapes and costs measured for `example_inputs`.

    `example_inputs` maps the forward's argument names to example tensors (meta tensors are
    enough: only shapes and dtypes are used). Raises `CaptureError` naming every operator
    outside the allow-list and where it is in the model.
    """
    graph_name = name or type(model).__name__
    _check_untied(model)
    try:
        converted = _convert(model, example_inputs, graph_name, source_lines=False)
    except CaptureError as fast_error:
        # Trace again, recording source lines, so the error can say where the problem is.
        try:
            _convert(model, example_inputs, graph_name, source_lines=True)
        except CaptureError as located:
            raise located from located.__cause__
        raise fast_error
    nodes, params, state, outputs = converted

    example = dict(example_inputs)
    batch = next((int(t.shape[0]) for t in example.values() if t.dim() > 0), 0)
    graph = Graph(
        name=graph_name,
        nodes=tuple(nodes),
        inputs=tuple(n.name for n in nodes if n.op == "input"),
        outputs=outputs,
        loss="",
        params=tuple(params),
        example_batch=batch,
    )
    try:
        graph.check_structure()
        graph = annotate(graph, example)
    except IRError as e:
        raise CaptureError(f"{graph_name}: {e}") from e
    graph = _mark_loss(graph)
    return CapturedModel(graph=graph, state=state)


_Converted = tuple[list[Node], list[ParamSpec], dict[str, torch.Tensor], tuple[str, ...]]


def _convert(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    graph_name: str,
    *,
    source_lines: bool,
) -> _Converted:
    """Trace the model and map each fx node onto the allow-list."""
    tracer = _Tracer(record_stack_traces=source_lines)
    try:
        fx_graph = tracer.trace(model)
    except Exception as e:  # fx raises many types for untraceable code
        raise CaptureError(
            f"cannot trace {type(model).__name__}: {type(e).__name__}: {e}. Capture needs a "
            "forward without Python control flow on tensor values (no if/for on tensor "
            "contents, no .item())"
        ) from e
    gm = fx.GraphModule(tracer.root, fx_graph)

    nodes: list[Node] = []
    params: list[ParamSpec] = []
    state: dict[str, torch.Tensor] = {}
    refused: list[str] = []
    outputs: tuple[str, ...] = ()

    def keep(qualname: str, t: torch.Tensor, trainable: bool) -> None:
        if qualname in state:
            return
        state[qualname] = t.detach().cpu().contiguous().clone()
        params.append(ParamSpec(qualname, tuple(t.shape), dtype_name(t.dtype), trainable))

    for fx_node in fx_graph.nodes:
        source = _source(fx_node)
        where = f"{fx_node.name} at {source}"
        args = tuple(_convert_arg(a, where) for a in fx_node.args)
        kwargs = tuple((k, _convert_arg(v, where)) for k, v in fx_node.kwargs.items())
        if fx_node.op == "placeholder":
            if fx_node.name not in example_inputs:
                raise CaptureError(f"no example given for input {fx_node.name!r}")
            nodes.append(Node(fx_node.name, "input", str(fx_node.target), source=source))
        elif fx_node.op == "get_attr":
            qualname = str(fx_node.target)
            t = _get_attr(gm, qualname)
            if not isinstance(t, torch.Tensor):
                raise CaptureError(f"{where}: attribute {qualname!r} is not a tensor")
            keep(qualname, t, isinstance(t, nn.Parameter) and t.requires_grad)
            nodes.append(Node(fx_node.name, "param", qualname, source=source))
        elif fx_node.op == "call_module":
            path = str(fx_node.target)
            sub = gm.get_submodule(path)
            if type(sub) not in ops.MODULE_CLASSES:
                kind = f"{type(sub).__module__}.{type(sub).__name__}"
                refused.append(f"module {kind} at {source}")
                continue
            spec = ops.module_spec_of(sub)
            try:
                ops.build_module_check(spec)
            except IRError as e:
                raise CaptureError(f"{where}: {e}") from None
            for local, t in (
                *sub.named_parameters(recurse=False),
                *sub.named_buffers(recurse=False),
            ):
                keep(f"{path}.{local}", t, isinstance(t, nn.Parameter) and t.requires_grad)
            nodes.append(
                Node(fx_node.name, "module", path, args, kwargs, module=spec, source=source)
            )
        elif fx_node.op == "call_function":
            fname = ops.function_name(fx_node.target)
            if fname is None:
                refused.append(f"function {ops.describe_callable(fx_node.target)} at {source}")
                continue
            nodes.append(Node(fx_node.name, "function", fname, args, kwargs, source=source))
        elif fx_node.op == "call_method":
            method = str(fx_node.target)
            if method not in ops.METHODS:
                refused.append(f"tensor method .{method}() at {source}")
                continue
            nodes.append(Node(fx_node.name, "method", method, args, kwargs, source=source))
        elif fx_node.op == "output":
            outputs = _output_names(fx_node.args[0], where)

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
    return nodes, params, state, outputs


def _get_attr(gm: nn.Module, qualname: str) -> Any:
    owner_path, _, local = qualname.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, local)


def _output_names(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, fx.Node):
        return (value.name,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, fx.Node) for v in value):
        return tuple(v.name for v in value)
    raise CaptureError(f"{where}: the model must return a tensor or a tuple of tensors")


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
