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
_FLOP_OPERATORS = frozenset(
    "linear matmul mm bmm addmm baddbmm einsum outer conv1d conv2d convolution "
    "scaled_dot_product_attention".split()
)


def bears_flops(node: Node) -> bool:
    """Whether the node runs an operator that torch's FLOP counter counts."""
    parts = node.target.split(".")
    return node.op == "function" and len(parts) == 3 and parts[1] in _FLOP_OPERATORS


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
        # A parameter's bytes are counted once, at the node that reads it.
        param_bytes = graph.param_specs[node.target].nbytes if node.op == "param" else 0
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
