"""A job's checkpoints: the parts stages send, and the state a new plan resumes from.

Each stage of a plan checkpoints its own tensors (parameters and optimizer state) at the
same step; the store keeps the parts and says when a step is complete. A new plan resumes
from the newest complete step (or the model's initial state), whatever its cut: each
stage is handed the tensors of the nodes it now owns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch

from coordinator.job_record import Job, JobError
from coordinator.store import StateStore
from opdag import model_file
from opdag.ir import CapturedModel
from opdag.optim import optimizer_param_name
from opdag.partition import Stage

# Complete checkpoints kept per job; older ones are pruned.
KEEP_CHECKPOINTS = 2


class Checkpoints:
    """Taking checkpoint parts in, and assembling the state a plan starts from."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

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
        """Store one stage's part of the checkpoint at `step`, after checking every tensor
        belongs to the model; True when this part completed the step."""
        allowed = {p.name for p in model.graph.params}
        for name in tensors:
            owner = optimizer_param_name(name) or name
            if owner not in allowed:
                raise JobError(f"checkpoint tensor {name!r} is not part of the model")
        blob = await asyncio.to_thread(model_file.encode_state, tensors)
        return await asyncio.to_thread(
            self.store.put_checkpoint_part, job_id, step, stage, num_stages, blob
        )

    async def prune(self, job_id: str) -> None:
        """Drop all but the newest complete checkpoints."""
        await asyncio.to_thread(self.store.prune_checkpoints, job_id, KEEP_CHECKPOINTS)

    async def latest(self, job_id: str) -> int:
        """The newest complete step (0: none, start from the model's initial state)."""
        return await asyncio.to_thread(self.store.latest_checkpoint, job_id) or 0

    async def discard_after(self, job_id: str, step: int) -> None:
        """Drop parts newer than the step a new plan resumes from (a broken plan's)."""
        await asyncio.to_thread(self.store.discard_checkpoints_after, job_id, step)

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
