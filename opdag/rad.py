"""Remote automatic differentiation, without the transport.

A `StageRunner` owns one stage: `forward(mb, inputs)` runs its graph for one micro-batch and
keeps the autograd state; `backward(mb, grads)` takes the gradients of the values it sent
(already summed over the stages that read them), runs local autograd and returns the
gradients of the values it received. Parameter gradients accumulate across micro-batches,
so `step()` after all micro-batches applies exactly the update one process would.

`LocalPipeline` drives all runners of a partition in one process, handing values and
gradients between them explicitly as a network would. Workers run the same `StageRunner`
with a network in between.

Backward passes run in micro-batch order (as 1F1B does), so each parameter's gradient sums
its micro-batch contributions in the same order as one process accumulating them: the
result is bit-identical, not merely close, and stays so over hundreds of steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from opdag.errors import IRError
from opdag.partition import Partition, Stage
from opdag.stage import StageModule
from opdag.values import Value, add_grads, map_tensors, tensor_leaves, value_nbytes

# Builds a stage's optimizer from its named parameters (None: the stage has nothing to train).
OptimizerFactory = Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer | None]


def _receive(value: Value, needs_grad: bool) -> Value:
    """A received value as fresh autograd leaves, as if it came off the wire."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if needs_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    return map_tensors(value, leaf)


@dataclass
class _Saved:
    inputs: dict[str, Value]
    outputs: dict[str, Value]


class StageRunner:
    """Forward and backward of one stage, micro-batch by micro-batch."""

    def __init__(
        self,
        stage: Stage,
        module: StageModule,
        *,
        num_micro_batches: int,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if num_micro_batches < 1:
            raise ValueError(f"num_micro_batches must be at least 1, not {num_micro_batches}")
        self.stage = stage
        self.module = module
        self.num_micro_batches = num_micro_batches
        self.optimizer = optimizer
        self._saved: dict[int, _Saved] = {}
        graph = stage.graph
        self._needs_grad = {
            name: bool(graph.node(name).meta and graph.node(name).meta.carries_grad)  # type: ignore[union-attr]
            for name in stage.recv
        }

    @property
    def pending(self) -> tuple[int, ...]:
        """Micro-batches run forward whose backward has not run yet."""
        return tuple(self._saved)

    def forward(self, mb: int, inputs: Mapping[str, Value]) -> dict[str, Value]:
        """Run micro-batch `mb`. `inputs` holds every received value and data input; returns
        the values to send (detached), and the loss when this stage computes it."""
        if mb in self._saved:
            raise IRError(f"stage {self.stage.index}: micro-batch {mb} ran forward twice")
        missing = [n for n in self.stage.graph.inputs if n not in inputs]
        if missing:
            raise IRError(f"stage {self.stage.index}: micro-batch {mb} lacks inputs {missing}")
        received = {
            name: _receive(inputs[name], self._needs_grad.get(name, False))
            for name in self.stage.graph.inputs
        }
        outputs = self.module(received)
        self._saved[mb] = _Saved(inputs=received, outputs=outputs)
        return {name: map_tensors(v, torch.Tensor.detach) for name, v in outputs.items()}

    def backward(self, mb: int, grads: Mapping[str, Value]) -> dict[str, Value]:
        """Backward of micro-batch `mb` given the gradients of the values it sent; returns
        the gradients of the values it received (None where no gradient flows)."""
        saved = self._saved.pop(mb, None)
        if saved is None:
            raise IRError(f"stage {self.stage.index}: backward of micro-batch {mb} before forward")
        roots: list[torch.Tensor] = []
        seeds: list[torch.Tensor] = []
        for name in self.stage.send:
            grad = grads.get(name)
            if grad is None:
                continue
            for t, g in zip(tensor_leaves(saved.outputs[name]), tensor_leaves(grad), strict=False):
                if t.requires_grad and g is not None:
                    if g.shape != t.shape:
                        raise IRError(
                            f"stage {self.stage.index}: gradient of {name!r} has shape "
                            f"{list(g.shape)}, the value has {list(t.shape)}"
                        )
                    roots.append(t)
                    seeds.append(g.to(dtype=t.dtype, device=t.device))
        if self.stage.loss:
            loss = saved.outputs[self.stage.loss]
            roots.append(loss)
            seeds.append(torch.full_like(loss, 1.0 / self.num_micro_batches))
        if roots:
            torch.autograd.backward(roots, seeds)
        return {
            name: map_tensors(saved.inputs[name], lambda t: t.grad)
            if self._needs_grad.get(name)
            else None
            for name in self.stage.recv
        }

    def step(self) -> None:
        """Apply the accumulated gradients and clear them."""
        if self._saved:
            raise IRError(
                f"stage {self.stage.index}: step with micro-batches {self.pending} "
                "still awaiting backward"
            )
        if self.optimizer is not None:
            self.optimizer.step()
        self.module.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop every saved micro-batch and gradient (a step abandoned after a fault)."""
        self._saved.clear()
        self.module.zero_grad(set_to_none=True)


@dataclass
class StepStats:
    """What one pipelined training step did."""

    loss: float
    seconds: float
    # Bytes per cut edge, forward values and backward gradients, summed over micro-batches.
    forward_bytes: dict[str, int] = field(default_factory=dict)
    backward_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.forward_bytes.values()) + sum(self.backward_bytes.values())


class LocalPipeline:
    """All stages of a partition in one process, with values and gradients handed between
    them explicitly: every micro-batch forward, then every micro-batch backward (in
    micro-batch order, each from the last stage to the first)."""

    def __init__(
        self,
        partition: Partition,
        state: Mapping[str, torch.Tensor],
        *,
        num_micro_batches: int,
        optimizer: OptimizerFactory | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not partition.graph.loss:
            raise IRError(f"graph {partition.graph.name!r} has no loss output to train")
        self.partition = partition
        self.num_micro_batches = num_micro_batches
        self.runners: list[StageRunner] = []
        for stage in partition.stages:
            module = StageModule(stage.graph, state, device=device)
            opt = optimizer(list(module.named_parameters())) if optimizer else None
            self.runners.append(
                StageRunner(stage, module, num_micro_batches=num_micro_batches, optimizer=opt)
            )
        self._consumers = {e.node: e.dsts for e in partition.edges}
        self._producer = {e.node: e.src for e in partition.edges}

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [p for r in self.runners for p in r.module.named_parameters()]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for r in self.runners:
            out.update(r.module.state_dict())
        return out

    def forward_backward(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> StepStats:
        """Forward and backward of every micro-batch; gradients accumulate, no step."""
        if len(micro_batches) != self.num_micro_batches:
            raise ValueError(
                f"expected {self.num_micro_batches} micro-batches, got {len(micro_batches)}"
            )
        start = time.perf_counter()
        fwd_bytes: dict[str, int] = {}
        bwd_bytes: dict[str, int] = {}
        losses: list[float] = []
        loss_stage = next(r for r in self.runners if r.stage.loss)
        for mb, data in enumerate(micro_batches):
            inbox: dict[int, dict[str, Value]] = {r.stage.index: {} for r in self.runners}
            for runner in self.runners:
                s = runner.stage
                inputs = {**{k: data[k] for k in s.data_inputs}, **inbox[s.index]}
                outputs = runner.forward(mb, inputs)
                for name in s.send:
                    fwd_bytes[name] = fwd_bytes.get(name, 0) + value_nbytes(outputs[name]) * len(
                        self._consumers[name]
                    )
                    for dst in self._consumers[name]:
                        inbox[dst][name] = outputs[name]
                if runner is loss_stage:
                    losses.append(float(outputs[s.loss]))
        for mb in range(len(micro_batches)):
            grads: dict[str, Value] = {}
            for runner in reversed(self.runners):
                s = runner.stage
                received = runner.backward(mb, {n: grads.get(n) for n in s.send})
                for name, grad in received.items():
                    if grad is None:
                        continue
                    bwd_bytes[name] = bwd_bytes.get(name, 0) + value_nbytes(grad)
                    grads[name] = add_grads(grads.get(name), grad)
        return StepStats(
            loss=sum(losses) / len(losses),
            seconds=time.perf_counter() - start,
            forward_bytes=fwd_bytes,
            backward_bytes=bwd_bytes,
        )

    def evaluate(self, data: Mapping[str, torch.Tensor]) -> float:
        """The loss of one batch, forward only, every stage in eval mode (no state kept)."""
        values: dict[str, Value] = {}
        loss = float("nan")
        with torch.no_grad():
            for runner in self.runners:
                s = runner.stage
                module = runner.module
                was_training = module.training
                module.eval()
                try:
                    outputs = module(
                        {**{k: data[k] for k in s.data_inputs}, **{k: values[k] for k in s.recv}}
                    )
                finally:
                    module.train(was_training)
                values.update({k: outputs[k] for k in s.send})
                if s.loss:
                    loss = float(outputs[s.loss])
        return loss

    def train_step(self, micro_batches: Sequence[Mapping[str, torch.Tensor]]) -> StepStats:
        """One optimizer step over the given micro-batches (the step is part of the time)."""
        start = time.perf_counter()
        stats = self.forward_backward(micro_batches)
        for runner in self.runners:
            runner.step()
        stats.seconds = time.perf_counter() - start
        return stats
