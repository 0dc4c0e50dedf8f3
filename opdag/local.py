"""Training a zoo model cut into stages, all in one process.

`LocalTrainer` is the staged counterpart of `ReferenceTrainer`: the same model (same seed),
captured into an OP-DAG, cut into stages and trained by remote autodiff with the same data,
micro-batches and optimizer. With lossless settings its losses and gradients equal the
reference's; that equality is what the tests check.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from opdag.capture import capture
from opdag.data import DataConfig, split_micro_batches
from opdag.ir import CapturedModel
from opdag.optim import OptimizerConfig, build_optimizer
from opdag.partition import Partition, balanced_assignment, partition
from opdag.rad import LocalPipeline, StepStats
from opdag.reference import training_source
from opdag.zoo import build_model, example_batch


@dataclass(frozen=True)
class LocalResult:
    """What a staged run measured."""

    losses: list[float]
    samples_per_s: float
    seconds: float
    val_loss: float | None
    # Bytes that crossed stages in one step, forward values plus backward gradients.
    bytes_per_step: int = 0
    edge_bytes: dict[str, int] = field(default_factory=dict)


class LocalTrainer:
    """Trains a zoo model as an OP-DAG cut into stages, in one process."""

    def __init__(
        self,
        *,
        model: str,
        model_args: Mapping[str, Any] | None = None,
        data: DataConfig,
        optimizer: OptimizerConfig,
        seed: int = 0,
        stages: int = 1,
        assignment: Mapping[str, int] | None = None,
        captured: CapturedModel | None = None,
    ) -> None:
        self.model_name = model
        self.data = data
        self.optimizer_config = optimizer
        self.source = training_source(model, model_args, data)
        if captured is None:
            torch_model = build_model(model, model_args, seed=seed)
            example = example_batch(model, model_args, data.micro_batch_size, device="meta")
            captured = capture(torch_model, example, name=model)
        self.captured = captured
        graph = captured.graph
        if assignment is None:
            assignment = balanced_assignment(graph, stages)
        self.partition: Partition = partition(graph, assignment)
        self.pipeline = LocalPipeline(
            self.partition,
            captured.state,
            num_micro_batches=data.micro_batches,
            optimizer=self._make_optimizer,
        )

    def _make_optimizer(
        self, named: list[tuple[str, torch.nn.Parameter]]
    ) -> torch.optim.Optimizer | None:
        trainable = [(n, p) for n, p in named if p.requires_grad]
        return build_optimizer(trainable, self.optimizer_config) if trainable else None

    def forward_backward(self, step: int) -> StepStats:
        """Accumulate the gradients of step `step`; no update."""
        micro = split_micro_batches(self.source.batch(step), self.data.micro_batches)
        return self.pipeline.forward_backward(micro)

    def gradients(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter's gradient by name (zeros where none was produced)."""
        return {
            name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in self.pipeline.named_parameters()
        }

    def optimizer_step(self) -> None:
        for runner in self.pipeline.runners:
            runner.step()

    def train_step(self, step: int) -> StepStats:
        start = time.perf_counter()
        stats = self.forward_backward(step)
        self.optimizer_step()
        stats.seconds = time.perf_counter() - start
        return stats

    def train_step_with_grads(self, step: int) -> tuple[StepStats, dict[str, torch.Tensor]]:
        stats = self.forward_backward(step)
        grads = self.gradients()
        self.optimizer_step()
        return stats, grads

    def evaluate(self, n_batches: int) -> float:
        """Mean loss over `n_batches` fixed validation batches, forward only."""
        losses = [self.pipeline.evaluate(b) for b in self.source.val_batches(n_batches)]
        return sum(losses) / len(losses)

    def run(
        self, steps: int, *, start: int = 0, progress: bool = False, eval_batches: int = 0
    ) -> LocalResult:
        """Train steps start..start+steps-1 (timed), then evaluate if asked."""
        losses: list[float] = []
        last: StepStats | None = None
        bar = tqdm(total=steps, desc=f"staged {self.model_name}", disable=not progress)
        began = time.perf_counter()
        for step in range(start, start + steps):
            last = self.train_step(step)
            losses.append(last.loss)
            elapsed = time.perf_counter() - began
            bar.update(1)
            bar.set_postfix(
                loss=f"{last.loss:.4f}",
                samples_s=f"{(step - start + 1) * self.data.batch_size / elapsed:.1f}",
            )
        seconds = time.perf_counter() - began
        bar.close()
        val_loss = self.evaluate(eval_batches) if eval_batches > 0 else None
        edge_bytes: dict[str, int] = {}
        if last is not None:
            for name, b in (*last.forward_bytes.items(), *last.backward_bytes.items()):
                edge_bytes[name] = edge_bytes.get(name, 0) + b
        return LocalResult(
            losses=losses,
            samples_per_s=steps * self.data.batch_size / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            val_loss=val_loss,
            bytes_per_step=last.total_bytes if last else 0,
            edge_bytes=edge_bytes,
        )
