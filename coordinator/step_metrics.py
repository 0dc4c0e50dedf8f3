"""Per-step metrics of a job's stages: storing what they report, and what a plan measured.

Every stage of every replica reports each step (its step and compute seconds, the bytes it
sent, what it spent averaging with its sync group) and is stored as its own record, keyed
by (step, stage, replica). Only the speaker, the one replica that speaks for the job, moves
the job: its last stage's loss and pace are the job's, and only its records carry "loss"
(another replica's loss is kept as "replica_loss"). A plan's measured step time is the
interval between the speaker's loss reports of its epoch.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from coordinator.job_record import Job, PlanReport, Progress, StageTimes
from coordinator.planning.plan import Plan
from coordinator.store import StateStore

# Steps back from the newest loss to look for one that every stage has reported.
BYTES_LOOKBACK_STEPS = 3


def bytes_per_step(
    records: list[dict[str, Any]], *, epoch: int, replica: int, stages: int, fallback: int
) -> int:
    """The bytes the stages of one pipeline (the speaker's, as with a single one) sent each
    other in the newest step all `stages` of them have reported. The last stage reports a
    step first (its loss), the first stage last (after its backward), so the step of the
    newest loss is rarely complete yet; without a complete step, `fallback`."""
    by_step: dict[int, list[int]] = {}
    for m in records:
        if m.get("epoch") == epoch and m.get("replica", 0) == replica:
            by_step.setdefault(int(m["step"]), []).append(int(m.get("bytes", 0)))
    complete = [step for step, sent in by_step.items() if len(sent) >= stages]
    return sum(by_step[max(complete)]) if complete else fallback


class StepMetrics:
    """The stored step metrics of every job."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def since(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """The job's stored per-step metrics from `since_step` on."""
        return await asyncio.to_thread(self.store.metrics, job_id, since_step)

    async def record(self, job: Job, p: Progress) -> bool:
        """Store a stage's report of a step; the speaker's report with the loss also moves
        the job's loss, steps done, smoothed step time and bytes per step (True then: the
        job changed and should be saved)."""
        replicas = job.plan.replicas if job.plan is not None else 1
        # Which replica reported and whether it speaks are the plan's, not the worker's say.
        replica = job.replica_of(p.worker_id) or 0
        speaker = job.speaks(p.worker_id)
        record: dict[str, Any] = {
            "epoch": p.epoch,
            "step_seconds": p.step_seconds,
            "compute_seconds": p.compute_seconds,
            "bytes": sum(p.sent.values()),
            "at": time.time(),
            # The replica's share of the batch: the replicas split it evenly.
            "samples": job.spec.data.batch_size / replicas,
            "sync_bytes": p.sync_bytes,
            "sync_seconds": p.sync_seconds,
            "staleness": p.staleness,
            "shares": p.shares,
            "speaker": speaker,
        }
        if p.loss is not None:
            record["loss" if speaker else "replica_loss"] = p.loss
        moves_job = speaker and p.loss is not None
        if moves_job:
            job.loss = p.loss
            job.steps_done = max(job.steps_done, p.step + 1)
            # A smoothed step time of the stage that computes the loss: the pipeline's pace.
            job.step_seconds = (
                p.step_seconds
                if job.step_seconds == 0
                else 0.8 * job.step_seconds + 0.2 * p.step_seconds
            )
        await asyncio.to_thread(
            self.store.put_metric, job.job_id, p.step, p.stage, record, replica=replica
        )
        if not moves_job:
            return False
        job.bytes_per_step = bytes_per_step(
            await self.since(job.job_id, max(0, p.step - BYTES_LOOKBACK_STEPS)),
            epoch=p.epoch,
            replica=replica,
            stages=job.plan.num_stages if job.plan is not None else 1,
            fallback=job.bytes_per_step,
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
        return PlanReport(
            measured, calibrated_step_s, max(len(times) - 1, 0), stage_times(plan, mine)
        )


def stage_times(plan: Plan, records: list[dict[str, Any]]) -> tuple[StageTimes, ...]:
    """Per stage of `plan`: the estimator's compute and waiting seconds per step beside the
    means its speaking replica measured (the plan's first step left out as warm-up)."""
    first = plan.start_step
    out = []
    for s in range(plan.num_stages):
        predicted = plan.stage_compute_s[s] if s < len(plan.stage_compute_s) else 0.0
        mine = [
            r
            for r in records
            if r.get("stage") == s and r.get("speaker", True) and r.get("step", first) > first
        ]
        compute = [float(r.get("compute_seconds", 0.0)) for r in mine]
        steps = [float(r.get("step_seconds", 0.0)) for r in mine]
        n = len(mine)
        out.append(
            StageTimes(
                stage=s,
                predicted_compute_s=predicted,
                predicted_wait_s=max(plan.predicted_step_s - predicted, 0.0),
                measured_compute_s=sum(compute) / n if n else 0.0,
                measured_wait_s=sum(max(a - b, 0.0) for a, b in zip(steps, compute, strict=True))
                / n
                if n
                else 0.0,
                steps_measured=n,
            )
        )
    return tuple(out)
