"""Build an executable module from a graph alone, and interpret it node by node.

`StageModule` never imports or needs the user's model class: it validates the graph against
the operator allow-list, declares each parameter and buffer under its qualified name, loads
the named tensors, and runs the ATen operators in order. The same interpreter propagates
shapes on the meta device at capture time and runs a stage on a worker.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from opdag import ops
from opdag.errors import IRError
from opdag.ir import Graph, Node, ParamSpec, dtype_of
from opdag.values import Value

NodeCall = Callable[[Node, list[Any], dict[str, Any]], Value]


class StageModule(nn.Module):
    """A graph (a whole model or one stage of it) as a trainable `nn.Module`.

    Parameters keep the qualified names they had in the captured model, so
    `named_parameters()` and `state_dict()` line up with the original.
    """

    def __init__(
        self,
        graph: Graph,
        state: Mapping[str, torch.Tensor] | None = None,
        *,
        device: str | torch.device = "cpu",
        copy: bool = True,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if validate:
            ops.validate_graph(graph)
        self.graph = graph
        self.device = torch.device(device)
        self._owner: dict[str, tuple[nn.Module, str]] = {}
        try:
            self._declare_params()
        except (KeyError, AttributeError, TypeError) as e:
            # torch refuses a submodule or tensor name that is already taken.
            raise IRError(f"graph {graph.name!r}: colliding module/parameter names: {e}") from None
        if self.device.type != "meta":
            if state is None:
                raise IRError(f"graph {graph.name!r}: building on {self.device} needs its tensors")
            self.load_tensors(state, copy=copy)
        self._free_after = self._plan_frees()

    # -- construction ---------------------------------------------------------------------

    def _container(self, path: str) -> nn.Module:
        """The (possibly new, empty) submodule at a dotted path."""
        module: nn.Module = self
        if not path:
            return module
        for part in path.split("."):
            child = module._modules.get(part)
            if child is None:
                child = nn.Module()
                module.add_module(part, child)
            module = child
        return module

    def _declare_params(self) -> None:
        for node in self.graph.nodes:
            if node.op != "param" or node.target in self._owner:
                continue
            spec = self.graph.param_specs[node.target]
            parent_path, _, local = spec.name.rpartition(".")
            parent = self._container(parent_path)
            t = torch.empty(spec.shape, dtype=dtype_of(spec.dtype), device="meta")
            if spec.trainable:
                parent.register_parameter(local, nn.Parameter(t))
            else:
                parent.register_buffer(local, t)
            self._owner[spec.name] = (parent, local)

    def load_tensors(self, state: Mapping[str, torch.Tensor], *, copy: bool = True) -> None:
        """Put real tensors in place of every parameter and buffer, checking each one."""
        specs = self.graph.param_specs
        missing = [name for name in self._owner if name not in state]
        if missing:
            raise IRError(f"graph {self.graph.name!r}: tensors missing for {missing[:5]}")
        for name, (owner, local) in self._owner.items():
            spec = specs[name]
            t = state[name]
            _check_spec(spec, tuple(t.shape), t.dtype, f"tensor {name!r}")
            t = t.detach().to(self.device)
            if copy:
                t = t.clone()
            if local in owner._parameters:
                owner._parameters[local] = nn.Parameter(t, requires_grad=spec.trainable)
            else:
                owner._buffers[local] = t

    def _plan_frees(self) -> list[list[str]]:
        """For each node, the values no later node reads (dropped to save memory)."""
        last: dict[str, int] = {}
        for i, node in enumerate(self.graph.nodes):
            for ref in node.refs():
                last[ref] = i
        keep = set(self.graph.outputs)
        frees: list[list[str]] = [[] for _ in self.graph.nodes]
        for name, i in last.items():
            if name not in keep:
                frees[i].append(name)
        return frees

    # -- execution ------------------------------------------------------------------------

    def tensor(self, name: str) -> torch.Tensor:
        owner, local = self._owner[name]
        t: torch.Tensor = getattr(owner, local)
        return t

    def call_node(self, node: Node, env: Mapping[str, Value]) -> Value:
        """Compute one node's value from the values of the nodes before it."""
        if node.op == "param":
            return self.tensor(node.target)
        args = [ops.resolve(a, env, self.device) for a in node.args]
        kwargs = {k: ops.resolve(v, env, self.device) for k, v in node.kwargs}
        flag = ops.TRAINING_FLAGS.get(node.target)
        # Dropout and batch norm follow train/eval mode (a batch norm without running
        # statistics normalises by the batch's own in both).
        if (
            flag is not None
            and len(args) > flag
            and args[flag] is True
            and (node.target != "aten.batch_norm.default" or args[3] is not None)
        ):
            args[flag] = self.training
        if node.target in ops.BUFFER_UPDATES and not self.training:
            return args[0]  # buffers (a batch norm's step count) change only in training
        try:
            return ops.call(node, args, kwargs)
        except IRError:
            raise
        except Exception as e:
            raise IRError(f"node {node.name!r} ({node.describe()}) failed: {e}") from e

    def forward(self, inputs: Mapping[str, Value]) -> dict[str, Value]:
        """Run the graph on its inputs; returns the value of each output by name."""
        missing = [name for name in self.graph.inputs if name not in inputs]
        if missing:
            raise IRError(f"graph {self.graph.name!r}: inputs missing: {missing}")
        if not self.graph.dynamic_batch:
            self._check_batch(inputs)
        env: dict[str, Value] = {name: inputs[name] for name in self.graph.inputs}
        for node, frees in zip(self.graph.nodes, self._free_after, strict=True):
            if node.op != "input":
                env[node.name] = self.call_node(node, env)
            for name in frees:
                env.pop(name, None)
        return {name: env[name] for name in self.graph.outputs}

    def _check_batch(self, inputs: Mapping[str, Value]) -> None:
        """A graph whose capture fixed the batch size runs that batch size alone."""
        for name in self.graph.inputs:
            value, meta = inputs[name], self.graph.node(name).meta
            if (
                isinstance(value, torch.Tensor)
                and meta is not None
                and meta.shape
                and value.dim()
                and value.shape[0] != meta.shape[0]
            ):
                raise IRError(
                    f"graph {self.graph.name!r} was captured for batches of "
                    f"{meta.shape[0]} (its model fixes the batch size), not "
                    f"{value.shape[0]} ({name!r})"
                )


def _check_spec(spec: ParamSpec, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
    if shape != spec.shape or dtype != dtype_of(spec.dtype):
        raise IRError(
            f"{what}: expected {spec.dtype}{list(spec.shape)} for {spec.name!r}, "
            f"got {str(dtype).removeprefix('torch.')}{list(shape)}"
        )
