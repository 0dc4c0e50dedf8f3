"""Noticing a running job that makes no progress, and whom to blame for it.

A worker can accept its stage and start, answer heart-beats, and then never compute: the
job would wait forever. The watch remembers when each running job's step count last
moved; once it has not moved for `timeout_s` the plan is re-planned, and the workers the
stall points at are backed off (`coordinator.exclusions`): those whose heart-beats do not
say they run this plan, or else, when the plan never made a step at all, those never
measured to make progress (`coordinator.capacity`) beside workers that were. A stall
that points at everyone (or no one) only re-plans: the job's fruitless re-plans end it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

from coordinator.job_record import Job
from coordinator.registry import Registry
from coordinator.states import STAGE_ACTIVE
from coordinator.worker_client import WorkerCallError

# A running job whose step count did not move for this long is re-planned. Long enough
# for a big model's slow first steps; a worker that stalls a job costs it at most this.
DEFAULT_PROGRESS_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Stall:
    """A job that stopped making progress: why, and the workers blamed."""

    reason: str
    blamed: tuple[str, ...]


class ProgressWatch:
    """When each running job last made a step, by job id."""

    def __init__(self, registry: Registry, timeout_s: float = DEFAULT_PROGRESS_TIMEOUT_S) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        # job id -> (epoch, steps done, monotonic time they were first seen)
        self._seen: dict[str, tuple[int, int, float]] = {}

    def check(self, job: Job, now: float | None = None) -> Stall | None:
        """A running job's stall, once its steps have not moved for `timeout_s`."""
        now = time.monotonic() if now is None else now
        mark = (job.epoch, job.steps_done)
        seen = self._seen.get(job.job_id)
        if seen is None or seen[:2] != mark:
            self._seen[job.job_id] = (*mark, now)
            return None
        if now - seen[2] < self.timeout_s or job.plan is None:
            return None
        del self._seen[job.job_id]
        ids = tuple(dict.fromkeys(job.plan.worker_ids))
        silent = tuple(w for w in ids if not self._runs(w, job))
        blamed = silent
        if not blamed and job.steps_done <= job.plan.start_step:
            capacity = self.registry.capacity
            if capacity is not None:
                blamed = tuple(w for w in ids if capacity.measured(w) is None)
        if len(blamed) == len(ids):
            blamed = ()  # nothing tells them apart: re-plan, exclude no one
        return Stall(f"no step of progress in {self.timeout_s:.0f} s", blamed)

    async def stalled(self, job: Job) -> Stall | None:
        """`check`, with the blamed workers backed off."""
        stall = self.check(job)
        if stall is not None:
            for worker_id in stall.blamed:
                await self.back_off(worker_id, f"job {job.job_id}: {stall.reason}")
        return stall

    async def back_off(self, worker_id: str, reason: str) -> None:
        """Leave a worker that stalled or failed a plan out of planning for its back-off."""
        w = self.registry.get(worker_id)
        if self.registry.exclusions is not None and w is not None:
            await self.registry.exclusions.back_off(
                worker_id, w.name, reason=reason, address=w.address
            )

    async def all_answer(self, calls: Iterable[Awaitable[None]]) -> None:
        """Await calls to a plan's workers together; every worker whose call failed is
        backed off (not only the first: a plan on many unreachable workers is then
        re-planned once, not once per worker), and the first failure is raised."""
        results = await asyncio.gather(*calls, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for e in failed:
            if isinstance(e, WorkerCallError):
                await self.back_off(e.worker_id, f"could not start a stage: {e}")
        if failed:
            raise failed[0]

    def _runs(self, worker_id: str, job: Job) -> bool:
        """Whether the worker's last heart-beat says it runs a stage of this plan."""
        w = self.registry.get(worker_id)
        if w is None or not w.alive:
            return False
        job_id, epoch, _step, state = w.reported
        return job_id == job.job_id and epoch == job.epoch and state in STAGE_ACTIVE

    def forget(self, job_id: str) -> None:
        self._seen.pop(job_id, None)
