"""The single-process PyTorch trainer: ground truth for correctness tests and the
baseline for speed figures.

A step is defined here once: the full batch of `step` is cut into `micro_batches` equal
micro-batches in order; each runs forward to its loss and backward of loss / M; then one
optimizer step. A pipelined run of the same model with the same micro-batches must match
it (BatchNorm statistics are therefore per micro-batch).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from opdag.data import DataConfig, DataError, DataSource, build_source, split_micro_batches
from opdag.optim import OptimizerConfig, build_optimizer
from opdag.zoo import build_model, data_kind, input_names, model_config


def training_source(
    model: str, model_args: Mapping[str, Any] | None, data: DataConfig
) -> DataSource:
    """The data source that feeds `model`, after checking the corpus suits it."""
    config = model_config(model, model_args)
    if data.kind != data_kind(model):
        raise DataError(
            f"data: corpus {data.corpus!r} gives {data.kind} batches but model "
            f"{model!r} trains on {data_kind(model)}"
        )
    source = build_source(data, context=getattr(config, "context", None))
    if tuple(source.input_names) != input_names(model):
        raise DataError(
            f"data: corpus {data.corpus!r} yields {source.input_names}, "
            f"model {model!r} takes {input_names(model)}"
        )
    return source


@dataclass(frozen=True)
class ReferenceResult:
    """What a reference run measured: per-step losses, throughput and final val loss."""

    losses: list[float]
    samples_per_s: float
    seconds: float
    val_loss: float | None


class ReferenceTrainer:
    """Trains a zoo model on one process, one optimizer, no tricks."""

    def __init__(
        self,
        *,
        model: str,
        model_args: Mapping[str, Any] | None = None,
        data: DataConfig,
        optimizer: OptimizerConfig,
        seed: int = 0,
    ) -> None:
        self.model_name = model
        self.data = data
        self.source = training_source(model, model_args, data)
        self.model = build_model(model, model_args, seed=seed)
        self.optimizer = build_optimizer(self.model.named_parameters(), optimizer)

    def forward_backward(self, step: int) -> float:
        """Accumulate the gradients of step `step` into .grad; returns the mean of the
        micro-batch losses. Does not update the parameters."""
        m = self.data.micro_batches
        total = 0.0
        for micro in split_micro_batches(self.source.batch(step), m):
            loss = self.model(**micro)
            # Dividing by M makes the accumulated gradient that of the mean loss.
            (loss / m).backward()
            total += loss.item()
        return total / m

    def gradients(self) -> dict[str, torch.Tensor]:
        """A copy of every parameter's gradient by name (zeros where none was produced)."""
        return {
            name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in self.model.named_parameters()
        }

    def optimizer_step(self) -> None:
        """Apply the accumulated gradients and clear them."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, step: int) -> float:
        """One training step on batch `step`; returns its loss (mean over micro-batches)."""
        loss = self.forward_backward(step)
        self.optimizer_step()
        return loss

    def train_step_with_grads(self, step: int) -> tuple[float, dict[str, torch.Tensor]]:
        """`train_step`, also returning the gradients as they were before the update."""
        loss = self.forward_backward(step)
        grads = self.gradients()
        self.optimizer_step()
        return loss, grads

    def evaluate(self, n_batches: int) -> float:
        """Mean loss over `n_batches` fixed validation batches, in eval mode (the model is
        back in training mode afterwards)."""
        self.model.eval()
        try:
            with torch.no_grad():
                losses = [self.model(**b).item() for b in self.source.val_batches(n_batches)]
        finally:
            self.model.train()
        return sum(losses) / len(losses)

    def run(
        self, steps: int, *, start: int = 0, progress: bool = False, eval_batches: int = 0
    ) -> ReferenceResult:
        """Train steps start..start+steps-1; time only the training, then evaluate on
        `eval_batches` validation batches (val_loss is None when 0)."""
        losses: list[float] = []
        bar = tqdm(total=steps, desc=f"reference {self.model_name}", disable=not progress)
        began = time.perf_counter()
        for step in range(start, start + steps):
            losses.append(self.train_step(step))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        seconds = time.perf_counter() - began
        bar.close()
        val_loss = self.evaluate(eval_batches) if eval_batches > 0 else None
        samples = steps * self.data.batch_size
        return ReferenceResult(
            losses=losses,
            samples_per_s=samples / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            val_loss=val_loss,
        )
