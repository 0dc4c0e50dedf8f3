"""Elastic replicas: a job of replicas loses one without going back to its last checkpoint,
and takes in workers that join as new replicas.

Shrink. When a worker of a job with replicas is lost, its replica is broken. If another
replica still has every worker, the coordinator keeps that one (replica 0 when it is
intact, else the lowest intact one) and stops the workers of every other replica, which are
free again. It tells the kept replica's workers that they are alone: a round in progress
completes with the shares that arrived (announced: a warning in the worker's log, and
`shares` below the group's size in the step's report), later ones have nobody to average
with. It then drains the kept replica: its stage 0 stops at the next step boundary, every
other stage at the same one, each uploading its state there. The job is then planned again
on every live worker (the kept replica's, the broken replica's survivors, any that joined)
from that state. No step is redone: the new plan starts from the kept replica's state at
the step it reached, relayed through the coordinator's store as the checkpoint of that step.
What the other intact replicas learnt since their last round (local SGD) is not kept: one
copy of each stage goes on.
Without an intact replica, or for a plan of one pipeline, the job is re-planned from its
last checkpoint, as before.

Grow. A running OP-Fence job whose replica count is `auto` is priced, at most every
`GROW_CHECK_S` and once for each set of free workers, while workers are free and their
links are measured (in the background: the search runs in a thread). When a plan over its
workers and the free ones is predicted at least `1 - GROW_GAIN` faster per step, every
stage drains at the next boundary of an averaging period (where local SGD's replicas hold
the averaged parameters) and the job is planned again, the free workers included, from the
state there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from coordinator.events import EventKind
from coordinator.job_record import Job
from coordinator.planning.planner import PlanRequest, make_plan
from coordinator.registry import WorkerSlot, WorkerState
from coordinator.states import JobState

if TYPE_CHECKING:
    from coordinator.job_lifecycle import JobLifecycle

log = logging.getLogger("archipelago.coordinator")

# How often a running job is priced against the free workers, and the predicted step time
# (as a share of the current plan's) below which it is re-planned to take them in.
GROW_CHECK_S = 10.0
GROW_GAIN = 0.9


class ElasticReplicas:
    """Shrinking a job of replicas when one breaks, growing it when workers join."""

    def __init__(self, lifecycle: JobLifecycle, *, drain_timeout_s: float) -> None:
        self.life = lifecycle
        self.drain_timeout_s = drain_timeout_s
        self._checked: dict[str, float] = {}  # job id -> when its growth was last priced
        # job id -> (plan epoch, workers) last priced: the same again is not worth a search
        self._priced: dict[str, tuple[int, frozenset[str]]] = {}

    # -- shrink -----------------------------------------------------------------------------

    def kept_replica(self, job: Job) -> int | None:
        """The replica a broken job of replicas can go on with: one whose workers are all
        alive (replica 0 first), or None."""
        plan = job.plan
        if plan is None or plan.replicas < 2:
            return None
        for r in range(plan.replicas):
            members = [p.worker_id for p in plan.placements if p.replica == r]
            workers = [self.life.registry.get(w) for w in members]
            if all(w is not None and w.alive and w.job_id == job.job_id for w in workers):
                return r
        return None

    async def lose(self, job: Job, lost: WorkerState) -> None:
        """`lost` was a worker of `job`'s plan: go on with an intact replica if there is
        one, else re-plan from the last checkpoint."""
        async with job.busy:
            plan = job.plan
            if job.alone and job.dropped(lost.worker_id):
                return  # a worker of a replica already let go (lost in the same sweep)
            if job.terminal or job.state not in (JobState.RUNNING,) or plan is None:
                keep = None
            elif job.alone or job.draining_until:
                keep = None  # a second loss while shrinking or draining: start over
            else:
                keep = self.kept_replica(job)
            if keep is None:
                reason = f"worker {lost.name} was lost"
            else:
                await self._keep_only(job, keep, lost)
                return
        await self.life.recover(job, reason)

    async def _keep_only(self, job: Job, keep: int, lost: WorkerState) -> None:
        plan = job.plan
        assert plan is not None
        dropped = [p for p in plan.placements if p.replica != keep]
        kept = sorted((p for p in plan.placements if p.replica == keep), key=lambda p: p.stage)
        log.warning(
            "job %s epoch %d: worker %s was lost; replica %d goes on alone to the next step "
            "boundary, then the job is planned again from its state there (replicas %s "
            "stopped)",
            job.job_id,
            job.epoch,
            lost.name,
            keep,
            sorted({p.replica for p in dropped}),
        )
        job.speaker, job.alone = keep, True
        await self.life.events.record(
            job.job_id,
            EventKind.SHRUNK,
            f"worker {lost.name} was lost: replica {keep} goes on alone to the next step "
            f"boundary (replicas {sorted({p.replica for p in dropped})} stopped), then the "
            "job is planned again",
            epoch=job.epoch,
            worker_id=lost.worker_id,
            worker_name=lost.name,
        )
        await self._promote_losses(job, keep)
        job.draining_until = time.monotonic() + self.drain_timeout_s
        stops = []
        for p in dropped:
            w = self.life.registry.get(p.worker_id)
            if w is not None and w.alive:
                stops.append(self.life.workers.stop(p.address, job.job_id, job.epoch, drain=False))
        await asyncio.gather(*stops)
        changed = self.life.registry.release(tuple(p.worker_id for p in dropped), job.job_id)
        await self.life.save_workers(changed)
        # Alone first, everywhere, so no stage still waits for a share; then stage 0 picks
        # the boundary the others stop at (`JobManager.on_progress`).
        await asyncio.gather(
            *(
                self.life.workers.stop(
                    p.address, job.job_id, job.epoch, drain=p.stage == 0, alone=True
                )
                for p in kept
            )
        )
        await self.life.table.save(job)

    async def _promote_losses(self, job: Job, keep: int) -> None:
        """The kept replica speaks now: its reports of the steps the old speaker's never
        reached (lost with a dead worker, or queued on a stopped one) become the job's, so
        no step is left without a loss. Every replica's loss is the step's global one."""
        store = self.life.store
        rows = await asyncio.to_thread(store.metrics, job.job_id, job.steps_done)
        for r in rows:
            if r.get("epoch") != job.epoch or int(r.get("replica", 0)) != keep:
                continue
            if "replica_loss" not in r or "loss" in r:
                continue
            step, stage = int(r["step"]), int(r["stage"])
            record = {k: v for k, v in r.items() if k not in ("step", "stage", "replica")}
            record["loss"], record["speaker"] = record.pop("replica_loss"), True
            await asyncio.to_thread(store.put_metric, job.job_id, step, stage, record, replica=keep)
            job.loss, job.steps_done = float(record["loss"]), max(job.steps_done, step + 1)

    # -- grow -------------------------------------------------------------------------------

    def consider_growth(self, job: Job) -> None:
        """Price `job` with the free workers, in the background, when that is due: at most
        every GROW_CHECK_S, and only when the free workers or the plan changed since."""
        spec, plan, life = job.spec, job.plan, self.life
        now = time.monotonic()
        if (
            plan is None
            or job.state != JobState.RUNNING
            or job.draining_until
            or spec.parallel.planner != "opfence"
            or spec.parallel.replicas is not None
            or now - self._checked.get(job.job_id, 0.0) < GROW_CHECK_S
        ):
            return
        free = life.registry.free()
        if not free:
            return
        mine = [life.registry.get(w) for w in plan.worker_ids]
        current = [
            WorkerSlot(
                w.worker_id, w.name, w.address, life.registry.planning_gflops(w), w.memory_bytes
            )
            for w in mine
            if w is not None
        ]
        ids = [w.worker_id for w in (*current, *free)]
        if life.links is not None and life.links.unmeasured(ids):
            return  # priced on measured links only (the prober measures joiners at once)
        key = (plan.epoch, frozenset(ids))
        if self._priced.get(job.job_id) == key or next_boundary(job) >= spec.steps:
            return  # this plan with these free workers was priced already, or ends soon
        self._checked[job.job_id], self._priced[job.job_id] = now, key
        life.spawn(self._price_growth(job, current, free))

    async def _price_growth(
        self, job: Job, current: list[WorkerSlot], free: list[WorkerSlot]
    ) -> None:
        """Drain `job` for a re-plan when the free workers make it predicted faster."""
        spec, plan, life = job.spec, job.plan, self.life
        assert plan is not None
        ids = [w.worker_id for w in (*current, *free)]
        model = await life.table.model_of(job)
        request = PlanRequest(
            job_id=job.job_id,
            epoch=job.epoch + 1,
            start_step=next_boundary(job),
            graph=model.graph,
            spec=spec,
            workers=[*current, *free],
            figures=life.links.figures(ids) if life.links else {},
            compute=life.calibration.model,
        )
        try:
            candidate, _ = await asyncio.to_thread(make_plan, request)
        except ValueError as e:
            log.info("job %s: no plan with the free workers to price: %s", job.job_id, e)
            return
        if not {w.worker_id for w in free} & set(candidate.worker_ids):
            return  # the best plan leaves the free workers out: nothing to take in
        # The plan running now, priced again with the same compute model as the candidate.
        now_s = await life.calibration.predicted_step_s(plan, model.graph, spec)
        if candidate.predicted_step_s > GROW_GAIN * now_s:
            log.info(
                "job %s: with the %d free worker(s) a step is predicted at %.3f s against "
                "%.3f s now; not worth a re-plan",
                job.job_id,
                len(free),
                candidate.predicted_step_s,
                now_s,
            )
            return
        async with job.busy:
            if job.state != JobState.RUNNING or job.draining_until or job.epoch != plan.epoch:
                return
            # Where the job is now (pricing took a while): no stage may be past it.
            boundary = next_boundary(job)
            if boundary >= spec.steps:
                return
            log.info(
                "job %s epoch %d: %d free worker(s) would take a step from %.3f s to %.3f s "
                "(%d stages x %d replicas); draining at step %d to take them in",
                job.job_id,
                job.epoch,
                len(free),
                now_s,
                candidate.predicted_step_s,
                candidate.num_stages,
                candidate.replicas,
                boundary,
            )
            job.draining_until = (
                time.monotonic() + self.drain_timeout_s + boundary_wait_s(job, boundary)
            )
            await life.events.record(
                job.job_id,
                EventKind.GROWN,
                f"{len(free)} free worker(s) would take a step from {now_s:.3f} s to "
                f"{candidate.predicted_step_s:.3f} s ({candidate.num_stages} stages x "
                f"{candidate.replicas} replicas): draining at step {boundary} to take them in",
                epoch=job.epoch,
                step=boundary,
            )
            await asyncio.gather(
                *(
                    life.workers.stop(
                        p.address, job.job_id, job.epoch, drain=True, steps_done=boundary
                    )
                    for p in plan.placements
                )
            )
            await life.table.save(job)

    def forget(self, job_id: str) -> None:
        self._checked.pop(job_id, None)
        self._priced.pop(job_id, None)


def next_boundary(job: Job) -> int:
    """The first step boundary no stage of the job can have passed that also ends an
    averaging period: the reported steps (the speaker's loss stage) plus three, as stage 0
    may be a step ahead and a report a step late, rounded up to the period (1 under
    `sync`)."""
    period = job.spec.sync.period if job.spec.sync.kind != "sync" else 1
    return -(-(job.steps_done + 3) // period) * period


def boundary_wait_s(job: Job, boundary: int) -> float:
    """About how long the job takes to reach step `boundary` at its measured pace."""
    return max(0, boundary - job.steps_done) * max(job.step_seconds, 1.0) * 2
