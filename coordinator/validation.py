"""The validation loss of a job: each complete checkpoint evaluated on held-out batches.

The workers train; the coordinator, which holds every complete checkpoint, evaluates it:
the job's model is built from the zoo (as it was at submission), given the checkpoint's
parameters and buffers, and its mean loss over `validation.batches` fixed held-out batches
of the job's corpus becomes a `validation` event of the job (`coordinator.events`), which
`status`, the dashboard and the metrics show. It runs in a thread, one checkpoint of a job
at a time: a checkpoint that completes while the last one is still being evaluated is
skipped, so a slow evaluation never queues up work.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping

import torch

from coordinator.checkpoints import Checkpoints
from coordinator.events import EventKind, EventLog
from coordinator.job_record import Job
from coordinator.planning.jobspec import JobSpec
from opdag.data import build_source
from opdag.ir import CapturedModel
from opdag.zoo import build_model

log = logging.getLogger("archipelago.coordinator")


class ValidationError(Exception):
    """A checkpoint cannot be evaluated (it lacks a tensor the model has)."""


def validation_loss(spec: JobSpec, state: Mapping[str, torch.Tensor], batches: int) -> float:
    """The mean loss of the job's model with the tensors of `state` over `batches` fixed
    held-out batches, in eval mode (no dropout)."""
    model = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed)
    own = model.state_dict()
    missing = sorted(name for name in own if name not in state)
    if missing:
        raise ValidationError(f"the checkpoint lacks {missing[:3]}")
    model.load_state_dict({name: state[name] for name in own})
    model.eval()
    source = build_source(spec.data, context=spec.context())
    with torch.no_grad():
        losses = [float(model(**b)) for b in source.val_batches(batches)]
    return sum(losses) / len(losses)


class CheckpointValidation:
    """Evaluates the jobs' checkpoints in the background and records their losses."""

    def __init__(self, checkpoints: Checkpoints, events: EventLog) -> None:
        self.checkpoints = checkpoints
        self.events = events
        self._running: set[str] = set()

    def busy(self, job_id: str) -> bool:
        """Whether a checkpoint of the job is being evaluated now."""
        return job_id in self._running

    async def evaluate(self, job: Job, model: CapturedModel, step: int) -> float | None:
        """Evaluate the checkpoint of `step` and record its loss (None: skipped, because
        validation is off for the job or another of its checkpoints is being evaluated,
        or failed, which is logged)."""
        batches = job.spec.validation.batches
        if batches == 0 or job.job_id in self._running:
            return None
        self._running.add(job.job_id)
        try:
            state = await self.checkpoints.resume_state(job.job_id, model, step)
            loss = await asyncio.to_thread(validation_loss, job.spec, state, batches)
        except Exception as e:  # a checkpoint that cannot be evaluated must not hurt the job
            log.warning("job %s: the checkpoint of step %d not validated: %s", job.job_id, step, e)
            return None
        finally:
            self._running.discard(job.job_id)
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
