"""A job's checkpoints: the parts stages send, which of them passed validation, and the
state a new plan resumes from.

Each stage of a plan checkpoints its own tensors (parameters and optimizer state) at the
same step; the store keeps the parts and says when a step is complete. Every part is
checked before it is stored (`coordinator.checkpoint_upload.check_checkpoint_part`: every
tensor of the stage, shaped as the model says, finite); a refused part changes nothing.
A complete step whose parts together hold every tensor of the model is marked *validated*;
one whose held-out loss (`coordinator.validation`) comes back not finite loses the mark. A
new plan resumes from the newest validated step (or the model's initial state), whatever
its cut: each stage is handed the tensors of the nodes it now owns. Pruning keeps the
`KEEP_CHECKPOINTS` newest complete steps, and never the newest validated one: every step
from it on is kept (the store prunes by count), so there is always one to go back to.

The marks are kept in a blob under the job (`job/{id}/checkpoint-marks`), with the steps
known complete; a job stored before marks existed reads its newest complete step as
validated.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from coordinator.job_record import Job, JobError
from coordinator.store import StateStore, StoreError
from opdag import model_file
from opdag.ir import CapturedModel, ParamSpec
from opdag.optim import optimizer_param_name
from opdag.partition import Partition, Stage

log = logging.getLogger("archipelago.coordinator")

# Complete checkpoints kept per job; older ones are pruned (never the newest validated).
KEEP_CHECKPOINTS = 2


def marks_key(job_id: str) -> str:
    return f"job/{job_id}/checkpoint-marks"


@dataclass
class CheckpointMarks:
    """The steps of a job known complete, and those of them that passed validation."""

    complete: set[int] = field(default_factory=set)
    validated: set[int] = field(default_factory=set)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {"complete": sorted(self.complete), "validated": sorted(self.validated)}
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CheckpointMarks:
        held = json.loads(raw)
        return cls({int(s) for s in held["complete"]}, {int(s) for s in held["validated"]})


class Checkpoints:
    """Taking checkpoint parts in, and assembling the state a plan starts from."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        # Per (job, epoch): each stage's tensors by name, as the plan's cut has them.
        self._stage_params: dict[tuple[str, int], dict[int, dict[str, ParamSpec]]] = {}
        # Per (job, step): the stage count and the tensor names of each part stored.
        self._parts: dict[tuple[str, int], tuple[int, dict[int, frozenset[str]]]] = {}
        self._marks: dict[str, CheckpointMarks] = {}

    def new_plan(self, job_id: str, epoch: int, cut: Partition) -> None:
        """A job was planned: note what each stage of the cut must checkpoint."""
        for key in [k for k in self._stage_params if k[0] == job_id]:
            del self._stage_params[key]
        self._stage_params[(job_id, epoch)] = {
            s.index: {p.name: p for p in s.graph.params} for s in cut.stages
        }

    def stage_params(self, job_id: str, epoch: int, stage: int) -> dict[str, ParamSpec] | None:
        """The tensors stage `stage` of the job's plan `epoch` holds (None: not known here,
        as for a job adopted from a previous coordinator)."""
        return self._stage_params.get((job_id, epoch), {}).get(stage)

    async def _marks_of(self, job_id: str) -> CheckpointMarks:
        marks = self._marks.get(job_id)
        if marks is not None:
            return marks
        raw = await asyncio.to_thread(self.store.get_blob, marks_key(job_id))
        try:
            marks = CheckpointMarks.from_bytes(raw) if raw else None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("job %s: checkpoint marks unreadable (%s); read afresh", job_id, e)
            marks = None
        if marks is None:  # a job from before the marks: its newest complete step holds
            latest = await asyncio.to_thread(self.store.latest_checkpoint, job_id)
            marks = CheckpointMarks(*([{latest}, {latest}] if latest else []))
        self._marks[job_id] = marks
        return marks

    async def _save_marks(self, job_id: str) -> None:
        marks = await self._marks_of(job_id)
        try:
            await asyncio.to_thread(self.store.put_blob, marks_key(job_id), marks.to_bytes())
        except (StoreError, ValueError) as e:
            log.warning("job %s: checkpoint marks not stored: %s", job_id, e)

    @staticmethod
    def check_fits(job: Job, *, stage: int, num_stages: int, step: int) -> None:
        """Refuse a checkpoint part that does not belong to the job's current plan."""
        assert job.plan is not None
        if num_stages != job.plan.num_stages or stage >= num_stages:
            raise JobError(f"checkpoint of stage {stage}/{num_stages} does not fit the plan")
        if not job.plan.start_step < step <= job.spec.steps:
            raise JobError(f"checkpoint step {step} is outside this plan's steps")

    async def accept(
        self,
        job_id: str,
        model: CapturedModel,
        *,
        stage: int,
        num_stages: int,
        step: int,
        tensors: Mapping[str, torch.Tensor],
    ) -> bool:
        """Store one stage's part of the checkpoint at `step` (checked already, see
        `check_checkpoint_part`), after checking every tensor belongs to the model; True
        when this part completed the step. A completed step is marked validated when its
        parts together hold every tensor of the model."""
        allowed = {p.name for p in model.graph.params}
        for name in tensors:
            owner = optimizer_param_name(name) or name
            if owner not in allowed:
                raise JobError(f"checkpoint tensor {name!r} is not part of the model")
        blob = await asyncio.to_thread(model_file.encode_state, tensors)
        complete = await asyncio.to_thread(
            self.store.put_checkpoint_part, job_id, step, stage, num_stages, blob
        )
        held = self._parts.get((job_id, step))
        if held is None or held[0] != num_stages:  # the store starts such a step anew too
            held = self._parts[(job_id, step)] = (num_stages, {})
        held[1][stage] = frozenset(tensors)
        if complete:
            names: set[str] = set()
            if len(held[1]) == num_stages:
                names = set().union(*held[1].values())
            else:  # parts stored before this coordinator started: read them back
                names = set(await self.resume_state(job_id, model, step))
            del self._parts[(job_id, step)]
            marks = await self._marks_of(job_id)
            marks.complete.add(step)
            missing = sorted(allowed - names)
            if missing:
                log.warning(
                    "job %s: the checkpoint of step %d lacks %s: not validated",
                    job_id,
                    step,
                    missing[:3],
                )
            else:
                marks.validated.add(step)
            await self._save_marks(job_id)
        return complete

    async def unvalidate(self, job_id: str, step: int, why: str) -> None:
        """The checkpoint of `step` failed a later check (its held-out loss): recovery no
        longer goes back to it."""
        marks = await self._marks_of(job_id)
        if step in marks.validated:
            marks.validated.discard(step)
            log.warning("job %s: the checkpoint of step %d is not valid: %s", job_id, step, why)
            await self._save_marks(job_id)

    async def validated(self, job_id: str, step: int) -> bool:
        """Whether the checkpoint of `step` passed validation (step 0: the model's own)."""
        return step == 0 or step in (await self._marks_of(job_id)).validated

    async def prune(self, job_id: str) -> None:
        """Drop all but the newest complete checkpoints, keeping the newest validated one."""
        marks = await self._marks_of(job_id)
        newest_valid = max(marks.validated, default=0)
        keep = max(KEEP_CHECKPOINTS, sum(1 for s in marks.complete if s >= newest_valid))
        await asyncio.to_thread(self.store.prune_checkpoints, job_id, keep)
        kept = sorted(marks.complete, reverse=True)[:keep]
        marks.complete &= set(kept)
        marks.validated &= set(kept)
        await self._save_marks(job_id)

    async def latest(self, job_id: str) -> int:
        """The newest validated complete step (0: none, start from the model's state)."""
        marks = await self._marks_of(job_id)
        stored = await asyncio.to_thread(self.store.latest_checkpoint, job_id) or 0
        return max((s for s in marks.validated if s <= stored), default=0)

    async def discard_after(self, job_id: str, step: int) -> None:
        """Drop parts newer than the step a new plan resumes from (a broken plan's)."""
        await asyncio.to_thread(self.store.discard_checkpoints_after, job_id, step)
        for key in [k for k in self._parts if k[0] == job_id and k[1] > step]:
            del self._parts[key]
        marks = await self._marks_of(job_id)
        if max(marks.complete, default=0) > step or max(marks.validated, default=0) > step:
            marks.complete = {s for s in marks.complete if s <= step}
            marks.validated = {s for s in marks.validated if s <= step}
            await self._save_marks(job_id)

    async def resume_state(
        self, job_id: str, model: CapturedModel, step: int
    ) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint at `step` (the model's own state at step 0)."""
        if step == 0:
            return dict(model.state)
        parts = await asyncio.to_thread(self.store.checkpoint_parts, job_id, step)
        state: dict[str, torch.Tensor] = {}
        for part in parts:
            state.update(
                await asyncio.to_thread(model_file.decode_state, part, f"checkpoint {step}")
            )
        return state

    @staticmethod
    def stage_tensors(
        job_id: str, stage: Stage, state: Mapping[str, torch.Tensor]
    ) -> list[tuple[str, torch.Tensor]]:
        """The tensors `stage` is handed: its parameters, then their optimizer state."""
        names = [p.name for p in stage.graph.params]
        wanted = set(names)
        names += sorted(k for k in state if optimizer_param_name(k) in wanted)
        missing = [n for n in names if n not in state]
        if missing:
            raise JobError(f"job {job_id}: the checkpoint lacks {missing[:3]}")
        return [(n, state[n]) for n in names]
