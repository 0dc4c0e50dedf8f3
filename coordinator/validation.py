"""The validation loss of a job: each complete checkpoint evaluated on held-out batches.

The workers train; the coordinator, which holds every complete checkpoint, evaluates it:
the job's model is built from the zoo (as it was at submission; a user's own model is run
from its captured graph, `StageModule`, as a stage runs it), given the checkpoint's
parameters and buffers, and its mean loss over `validation.batches` fixed held-out batches
of the job's corpus becomes a `validation` event of the job (`coordinator.events`), which
`status`, the dashboard and the metrics show. It runs in a thread, one checkpoint of a job
at a time: of the checkpoints that complete while one is being evaluated, only the newest
is evaluated next, so a slow evaluation never queues up work.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

import torch

from coordinator.checkpoints import Checkpoints
from coordinator.datasets import Datasets
from coordinator.events import EventKind, EventLog
from coordinator.job_record import Job
from coordinator.planning.jobspec import JobSpec
from opdag.data import build_source, split_micro_batches
from opdag.data.dataset import StoredDataset
from opdag.ir import CapturedModel
from opdag.stage import StageModule
from opdag.zoo import build_model

log = logging.getLogger("archipelago.coordinator")


class ValidationError(Exception):
    """A checkpoint cannot be evaluated (it lacks a tensor the model has)."""


def validation_loss(
    spec: JobSpec,
    state: Mapping[str, torch.Tensor],
    batches: int,
    captured: CapturedModel | None = None,
    dataset: StoredDataset | None = None,
) -> float:
    """The mean loss of the job's model with the tensors of `state` over `batches` fixed
    held-out batches, in eval mode (no dropout). A user's model is its `captured` graph."""
    if spec.model.zoo is None:
        assert captured is not None  # a user's model exists only as its graph
        return graph_validation_loss(spec, captured, state, batches, dataset)
    model = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed)
    own = model.state_dict()
    missing = sorted(name for name in own if name not in state)
    if missing:
        raise ValidationError(f"the checkpoint lacks {missing[:3]}")
    model.load_state_dict({name: state[name] for name in own})
    model.eval()
    source = build_source(spec.data, context=spec.context(), dataset=dataset)
    with torch.no_grad():
        losses = [float(model(**b)) for b in source.val_batches(batches)]
    return sum(losses) / len(losses)


def graph_validation_loss(
    spec: JobSpec,
    captured: CapturedModel,
    state: Mapping[str, torch.Tensor],
    batches: int,
    dataset: StoredDataset | None = None,
) -> float:
    """`validation_loss` of a captured graph, run as a stage runs it (`StageModule`, from
    the graph alone), one micro-batch at a time: the graph was captured for that shape."""
    graph = captured.graph
    missing = sorted(p.name for p in graph.params if p.name not in state)
    if missing:
        raise ValidationError(f"the checkpoint lacks {missing[:3]}")
    module = StageModule(graph, {p.name: state[p.name] for p in graph.params}).eval()
    source = build_source(spec.data, context=spec.context(), dataset=dataset)
    losses: list[float] = []
    with torch.no_grad():
        for batch in source.val_batches(batches):
            micro = split_micro_batches(batch, spec.data.micro_batches)
            # Equal micro-batches: the batch's mean loss is the mean of theirs.
            losses.append(sum(float(module(m)[graph.loss]) for m in micro) / len(micro))
    return sum(losses) / len(losses)


class CheckpointValidation:
    """Evaluates the jobs' checkpoints in the background and records their losses."""

    def __init__(
        self, checkpoints: Checkpoints, events: EventLog, datasets: Datasets | None = None
    ) -> None:
        self.checkpoints = checkpoints
        self.events = events
        # Where a job's own dataset is read from (the held-out chunks, hashes checked).
        self.datasets = datasets
        self._running: set[str] = set()
        # The newest checkpoint of a job that completed while another was being evaluated.
        self._next: dict[str, int] = {}

    def busy(self, job_id: str) -> bool:
        """Whether a checkpoint of the job is being evaluated now."""
        return job_id in self._running

    async def evaluate(
        self, job: Job, model: CapturedModel, step: int
    ) -> list[tuple[int, float]]:
        """Evaluate the checkpoint of `step` and record its loss; returns the (step, loss)
        pairs recorded. While another checkpoint of the job is being evaluated, `step` is
        only noted: that evaluation goes on with the newest checkpoint noted (the ones in
        between are skipped) and this call returns nothing. Nothing when validation is off
        for the job; a checkpoint that cannot be evaluated is logged and skipped."""
        batches = job.spec.validation.batches
        if batches == 0:
            return []
        if job.job_id in self._running:
            self._next[job.job_id] = max(step, self._next.get(job.job_id, step))
            return []
        self._running.add(job.job_id)
        done: list[tuple[int, float]] = []
        try:
            at: int | None = step
            while at is not None:
                loss = await self._evaluate_one(job, model, at, batches)
                if loss is not None:
                    done.append((at, loss))
                at = self._next.pop(job.job_id, None)
        finally:
            self._running.discard(job.job_id)
            self._next.pop(job.job_id, None)
        return done

    async def _evaluate_one(
        self, job: Job, model: CapturedModel, step: int, batches: int
    ) -> float | None:
        try:
            state = await self.checkpoints.resume_state(job.job_id, model, step)
            dataset = await self._dataset(job)
            loss = await asyncio.to_thread(
                validation_loss, job.spec, state, batches, model, dataset
            )
        except Exception as e:  # a checkpoint that cannot be evaluated must not hurt the job
            log.warning("job %s: the checkpoint of step %d not validated: %s", job.job_id, step, e)
            return None
        shown = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        await self.events.record(
            job.job_id,
            EventKind.VALIDATION,
            f"validation loss {shown} at step {step} ({batches} held-out batches)",
            step=step,
            loss=loss,
            batches=batches,
        )
        return loss

    async def _dataset(self, job: Job) -> StoredDataset | None:
        """The job's own dataset, as pinned at submission (None for a built-in corpus)."""
        if not job.spec.data.dataset:
            return None
        if self.datasets is None:
            raise ValidationError("this validation has no dataset store")
        manifest = await self.datasets.manifest(job.fingerprint)
        return self.datasets.reader(manifest)
