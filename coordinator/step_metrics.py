"""Per-step metrics of a job's stages: storing what they report, and what a plan measured.

Every stage reports each step (its step and compute seconds, the bytes it sent); the stage
that computes the loss also sets the job's pace. A plan's measured step time is the
interval between loss reports of its epoch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from coordinator.job_record import Job, PlanReport, Progress
from coordinator.planning.plan import Plan
from coordinator.store import StateStore


class StepMetrics:
    """The stored step metrics of every job."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def since(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """The job's stored per-step metrics from `since_step` on."""
        return await asyncio.to_thread(self.store.metrics, job_id, since_step)

    async def record(self, job: Job, p: Progress) -> bool:
        """Store a stage's report of a step; a report with the loss also moves the job's
        loss, steps done, smoothed step time and bytes per step (True then: the job
        changed and should be saved)."""
        record: dict[str, Any] = {
            "epoch": p.epoch,
            "step_seconds": p.step_seconds,
            "compute_seconds": p.compute_seconds,
            "bytes": sum(p.sent.values()),
            "at": time.time(),
        }
        if p.loss is not None:
            record["loss"] = p.loss
            job.loss = p.loss
            job.steps_done = max(job.steps_done, p.step + 1)
            # A smoothed step time of the stage that computes the loss: the pipeline's pace.
            job.step_seconds = (
                p.step_seconds
                if job.step_seconds == 0
                else 0.8 * job.step_seconds + 0.2 * p.step_seconds
            )
        await asyncio.to_thread(self.store.put_metric, job.job_id, p.step, p.stage, record)
        if p.loss is None:
            return False
        metrics = await self.since(job.job_id, p.step)
        job.bytes_per_step = sum(
            int(m.get("bytes", 0))
            for m in metrics
            if m["step"] == p.step and m.get("epoch") == p.epoch
        )
        return True

    async def plan_report(self, job_id: str, plan: Plan, calibrated_step_s: float) -> PlanReport:
        """The plan against its measured steps: the mean step time (the interval between
        loss reports, the first step of the plan left out as warm-up), beside the
        prediction re-made with calibrated compute times."""
        records = await self.since(job_id, plan.start_step)
        mine = [r for r in records if r.get("epoch") == plan.epoch]
        times = sorted((r["step"], r["at"]) for r in mine if "loss" in r and "at" in r)[1:]
        measured = 0.0
        if len(times) >= 2:
            measured = (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
        return PlanReport(measured, calibrated_step_s, max(len(times) - 1, 0))
