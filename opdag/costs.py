"""Annotate every node with what it produces and what it costs, without real compute.

The graph runs once on the meta device (shapes and dtypes only, nothing allocated). Each
node's forward FLOPs are counted while it runs, and its backward FLOPs by differentiating
just that node (run on fresh copies of its inputs) with respect to those inputs and its
parameters, under torch's FLOP counter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from opdag.errors import IRError
from opdag.ir import Costs, Graph, Node
from opdag.values import Value, map_tensors, meta_of, tensor_leaves, value_nbytes

# The operators torch's FLOP counter has formulas for (matrix products, convolutions,
# attention); every other operator counts zero FLOPs forward and backward, so only these
# run under the (slow, Python-dispatched) counter.
_FLOP_MODULES = frozenset({"Linear", "Conv1d", "Conv2d"})
_FLOP_FUNCTIONS = frozenset(
    {
        "torch.matmul",
        "torch.bmm",
        "torch.mm",
        "torch.addmm",
        "torch.baddbmm",
        "torch.einsum",
        "torch.outer",
        "operator.matmul",
        "torch.nn.functional.linear",
        "torch.nn.functional.conv1d",
        "torch.nn.functional.conv2d",
        "torch.nn.functional.scaled_dot_product_attention",
    }
)
_FLOP_METHODS = frozenset({"matmul"})


def bears_flops(node: Node) -> bool:
    """Whether the node runs an operator that torch's FLOP counter counts."""
    if node.op == "module":
        return node.module is not None and node.module.type in _FLOP_MODULES
    if node.op == "function":
        return node.target in _FLOP_FUNCTIONS
    return node.op == "method" and node.target in _FLOP_METHODS


def annotate(graph: Graph, example_inputs: Mapping[str, torch.Tensor]) -> Graph:
    """The graph with `meta` (shape, dtype, requires_grad) and `costs` set on every node."""
    # Imported here: the stage builder itself depends on nothing in this module.
    from opdag.stage import StageModule

    module = StageModule(graph, device="meta", validate=False)
    module.train()
    env: dict[str, Value] = {}
    annotated: list[Node] = []
    for node in graph.nodes:
        if node.op == "input":
            if node.name not in example_inputs:
                raise IRError(f"no example given for input {node.name!r}")
            value = example_inputs[node.name].detach().to("meta")
            fwd = bwd = 0.0
        else:
            # Each node runs on fresh leaves of its inputs, so differentiating it later
            # walks through this node alone, not back through the rest of the graph.
            local = {ref: map_tensors(env[ref], _fresh_leaf) for ref in dict.fromkeys(node.refs())}
            if bears_flops(node):
                with FlopCounterMode(display=False) as counter:
                    value = module.call_node(node, local)
                fwd = float(counter.get_total_flops())
                bwd = _backward_flops(node, value, local, module)
            else:
                value = module.call_node(node, local)
                fwd = bwd = 0.0
        env[node.name] = value
        owned = graph.owned_params(node)
        param_bytes = sum(graph.param_specs[p].nbytes for p in owned) if node.op == "module" else 0
        costs = Costs(
            fwd_flops=fwd,
            bwd_flops=bwd,
            param_bytes=param_bytes,
            out_bytes=value_nbytes(value),
        )
        annotated.append(replace(node, meta=meta_of(value), costs=costs))
    return graph.with_nodes(tuple(annotated))


def _fresh_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def _backward_flops(
    node: Node, value: Value, env: Mapping[str, Value], module: torch.nn.Module
) -> float:
    outs = [t for t in tensor_leaves(value) if t.requires_grad and t.is_floating_point()]
    if not outs:
        return 0.0
    wrt: list[torch.Tensor] = []
    for ref in dict.fromkeys(node.refs()):
        wrt += [t for t in tensor_leaves(env[ref]) if t.requires_grad]
    if node.op == "module":
        sub = module.get_submodule(node.target)
        wrt += [p for p in sub.parameters(recurse=False) if p.requires_grad]
    if not wrt:
        return 0.0
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(
            outs,
            wrt,
            grad_outputs=[torch.ones_like(t) for t in outs],
            retain_graph=True,
            allow_unused=True,
        )
    return float(counter.get_total_flops())
