"""Every job the coordinator holds: in memory, in the store, and watched.

A job is stored before it is acknowledged, and every change to it is stored and then
announced, so a watcher sees each state the store held. Models are kept in the store
beside their job and cached here once decoded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence

from coordinator.job_record import Job, JobError, StaleReport
from coordinator.planning.plan import Plan
from coordinator.states import JOB_PLAN_OUT
from coordinator.store import StateStore
from opdag import model_file
from opdag.ir import CapturedModel


class JobTable:
    """The jobs by id, their stored records and models, and who waits for their changes."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self.jobs: dict[str, Job] = {}
        self._models: dict[str, CapturedModel] = {}
        self._changed = asyncio.Condition()

    def get(self, job_id: str) -> Job:
        """The job, or JobError when there is none by that id."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id!r}")
        return job

    def current_job(self, job_id: str, epoch: int) -> Job:
        """The job a worker reports on, if the report is of the plan out now; else
        StaleReport."""
        job = self.jobs.get(job_id)
        if job is None:
            raise StaleReport(f"no job {job_id!r}")
        if job.epoch != epoch or job.state not in JOB_PLAN_OUT:
            raise StaleReport(f"job {job_id} is at epoch {job.epoch} ({job.state}), not {epoch}")
        return job

    async def add(
        self, job: Job, model: CapturedModel, export_names: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A new job: store its model (and the names its tensors are exported under, for
        a user's model), then the job itself."""
        await asyncio.to_thread(
            self.store.put_blob, f"job/{job.job_id}/model", model_file.encode_model(model)
        )
        if export_names:
            blob = json.dumps([list(pair) for pair in export_names]).encode()
            await asyncio.to_thread(self.store.put_blob, f"job/{job.job_id}/export-names", blob)
        self._models[job.job_id] = model
        self.jobs[job.job_id] = job
        await self.save(job)

    def adopt(self, job: Job) -> None:
        """Hold a job read back from the store (its record is there already)."""
        self.jobs[job.job_id] = job

    async def save(self, job: Job) -> None:
        """Store the job as it is now, and tell its watchers."""
        job.updated_at = time.time()
        await asyncio.to_thread(self.store.put_job, job.record())
        await self.notify(job)

    async def save_with_plan(self, job: Job, plan: Plan) -> None:
        """Store the job and its new plan together (one write: both or neither); the
        caller tells the watchers once the workers are assigned."""
        job.updated_at = time.time()
        await asyncio.to_thread(self.store.put_job_and_plan, job.record(), plan.to_dict())

    async def stored_plan(self, job_id: str) -> Plan | None:
        """The plan the store holds for the job, if any."""
        plan = await asyncio.to_thread(self.store.get_plan, job_id)
        return Plan.from_dict(plan) if plan is not None else None

    async def notify(self, job: Job) -> None:
        """Tell the job's watchers it changed."""
        job.version += 1
        async with self._changed:
            self._changed.notify_all()

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then again at every change, until it ends."""
        job = self.get(job_id)
        while True:
            seen = job.version
            yield job
            if job.terminal:
                return
            async with self._changed:
                await self._changed.wait_for(lambda: job.version != seen)  # noqa: B023

    async def model_of(self, job: Job) -> CapturedModel:
        """The job's captured model (read from the store after a restart)."""
        model = self._models.get(job.job_id)
        if model is None:
            blob = await asyncio.to_thread(self.store.get_blob, f"job/{job.job_id}/model")
            if blob is None:
                raise JobError(f"job {job.job_id}: its model is missing from the store")
            model = await asyncio.to_thread(model_file.decode_model, blob)
            self._models[job.job_id] = model
        return model

    async def export_names_of(self, job: Job) -> list[tuple[str, str]]:
        """(name in the user's module, graph tensor) of a user's model, as stored at
        submission; empty for a model exported under the graph's own names."""
        blob = await asyncio.to_thread(self.store.get_blob, f"job/{job.job_id}/export-names")
        if not blob:
            return []
        return [(str(name), str(tensor)) for name, tensor in json.loads(blob)]
