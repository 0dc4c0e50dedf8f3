"""Moving jobs through their states: plan, hand out, run, recover, end.

    queued -> starting -> running -> completed
                 ^           |
                 +-- recovering <- (a worker is lost, fails, or leaves)
    any live state -> cancelled | failed

A plan is stored before any worker hears of it. Training state lives in checkpoints: when
a plan breaks, the job is planned again on the workers that remain (or that joined) and
resumes from its last complete checkpoint. A coordinator restarted on the same store
takes every job back: running jobs keep running if their workers are still there, and are
re-planned from their checkpoint if not.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

import torch

from coordinator.calibration import ComputeCalibration
from coordinator.checkpoints import Checkpoints
from coordinator.elastic import ElasticReplicas
from coordinator.events import CLUSTER, EventKind, EventLog
from coordinator.handover import StageHandover
from coordinator.job_record import Job
from coordinator.job_table import JobTable
from coordinator.link_survey import LinkProber
from coordinator.planning.plan import Plan, stage_routes
from coordinator.planning.planner import PlanRequest, make_plan
from coordinator.planning.stage_sync import SyncLayer, group_link_rate, stage_sync_layers
from coordinator.progress_watch import ProgressWatch
from coordinator.registry import Registry, WorkerState
from coordinator.states import JOB_PLAN_OUT, JOB_WAITING, JobState, WorkerStatus
from coordinator.store import StateStore
from coordinator.worker_client import WorkerCallError, WorkerClient
from opdag.errors import OpDagError
from opdag.partition import Partition

log = logging.getLogger("archipelago.coordinator")

# Re-plans in a row without a single step of progress before a job is declared failed.
MAX_FRUITLESS_RECOVERIES = 5
# How long a job waits for links between free workers to be measured before it is
# planned with what is known.
LINK_WAIT_S = 30.0


def plural(n: int, noun: str) -> str:
    """"1 stage", "2 stages"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class JobLifecycle:
    """The scheduler: plans waiting jobs on free workers, and re-plans broken ones."""

    def __init__(
        self,
        *,
        store: StateStore,
        registry: Registry,
        workers: WorkerClient,
        table: JobTable,
        checkpoints: Checkpoints,
        calibration: ComputeCalibration,
        links: LinkProber | None,
        events: EventLog,
        drain_timeout_s: float = 120.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.workers = workers
        self.table = table
        self.checkpoints = checkpoints
        self.calibration = calibration
        self.links = links
        self.events = events
        self._tasks: set[asyncio.Task[Any]] = set()
        self.elastic = ElasticReplicas(self, drain_timeout_s=drain_timeout_s)
        # Running jobs that stopped making steps, and the workers to blame.
        self.progress = ProgressWatch(registry)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in the background (until it ends or `close` cancels it)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def save_workers(self, workers: list[WorkerState]) -> None:
        """Store the workers' current records (after the registry changed them)."""
        for w in workers:
            await asyncio.to_thread(self.store.put_worker, w.to_record())

    async def _release(self, job: Job) -> None:
        """Free the workers of the job's plan that still hold it."""
        assert job.plan is not None
        changed = self.registry.release(job.plan.worker_ids, job.job_id)
        await self.save_workers(changed)

    # -- restart ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """Take over what a previous coordinator left in the store."""
        await self.calibration.load()
        self.registry.load(await asyncio.to_thread(self.store.list_workers))
        for record in await asyncio.to_thread(self.store.list_jobs):
            job = Job.from_record(record)
            self.table.adopt(job)
            job.plan = await self.table.stored_plan(job.job_id)
            if job.state == JobState.RUNNING and job.plan is not None:
                # Its workers may still be training: adopt them; if they are gone, the
                # lost-worker check re-plans the job from its checkpoint.
                job.running_since = time.monotonic()
                log.info(
                    "adopted running job %s (epoch %d, step %d)",
                    job.job_id,
                    job.epoch,
                    job.steps_done,
                )
            elif job.state in JOB_PLAN_OUT:
                job.state = JobState.RECOVERING
                await self.table.save(job)
        # Workers the old coordinator had on jobs that are no longer running are free.
        for w in self.registry.workers.values():
            held = self.table.jobs.get(w.job_id)
            if w.job_id and (
                held is None or held.state != JobState.RUNNING or held.epoch != w.epoch
            ):
                self.registry.release((w.worker_id,), w.job_id)

    # -- scheduling ------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass of the scheduler: notice lost workers, plan waiting jobs."""
        lost = self.registry.expire()
        if lost:
            await self.save_workers(lost)
        for w in lost:
            went = "left" if w.state == WorkerStatus.LEFT else "stopped heart-beating: lost"
            log.warning("worker %s (%s) %s", w.name, w.worker_id, went)
            await self.events.record(
                CLUSTER,
                EventKind.LEFT if w.state == WorkerStatus.LEFT else EventKind.LOST,
                f"worker {w.name} {went}",
                worker_id=w.worker_id,
                worker_name=w.name,
            )
            job = self.table.jobs.get(w.job_id)
            if job is not None and not job.terminal and job.epoch == w.epoch:
                if w.state == WorkerStatus.LEFT and job.draining_until:
                    continue  # it drained and went; the drain finishes without it
                if w.state == WorkerStatus.LOST:
                    runs = [
                        f"stage {p.stage} of replica {p.replica}"
                        for p in (job.plan.placements if job.plan else ())
                        if p.worker_id == w.worker_id
                    ]
                    await self.events.record(
                        job.job_id,
                        EventKind.WORKER_LOST,
                        f"worker {w.name} ({', '.join(runs) or 'no stage'}) stopped heart-beating",
                        epoch=job.epoch,
                        worker_id=w.worker_id,
                        worker_name=w.name,
                    )
                # A job of replicas goes on with an intact one; others are re-planned.
                self.spawn(self.elastic.lose(job, w))
        now = time.monotonic()
        for job in sorted(self.table.jobs.values(), key=lambda j: j.created_at):
            if job.busy.locked():
                continue
            if job.state in JOB_WAITING:
                await self._launch(job)
            elif job.draining_until and now > job.draining_until:
                self.recover_later(job, "the drain did not finish in time")
            elif job.state == JobState.RUNNING:
                stall = await self.progress.stalled(job)
                if stall is not None:
                    self.recover_later(job, stall.reason)
                    continue
                self.elastic.consider_growth(job)

    def _links_ready(self, job: Job, worker_ids: list[str]) -> bool:
        """Whether to plan now: OP-Fence and AdaTopK plan on measured links, so they wait
        (a bounded time) for the links between the free workers to be measured."""
        if self.links is None:
            return True
        spec = job.spec
        wants_links = spec.parallel.planner == "opfence" or spec.compression.kind == "adatopk"
        if not wants_links or not self.links.unmeasured(worker_ids):
            return True
        now = time.monotonic()
        if not job.waiting_since:
            job.waiting_since = now
            log.info("job %s waits for link measurements between the free workers", job.job_id)
        if now - job.waiting_since < LINK_WAIT_S:
            return False
        log.warning(
            "job %s: links still unmeasured after %.0f s; planning with what is known",
            job.job_id,
            LINK_WAIT_S,
        )
        return True

    async def _launch(self, job: Job) -> None:
        async with job.busy:
            if job.state not in JOB_WAITING:
                return
            free = self.registry.free()
            want = job.spec.parallel.stages
            replicas = job.spec.parallel.replicas or 1  # auto: at least one pipeline
            model = await self.table.model_of(job)
            if want is None:
                n = min(len(free), len(model.graph.compute_nodes))
                n = n if n >= replicas else 0
            else:
                n = want * replicas if len(free) >= want * replicas else 0
            if n == 0:
                return
            if not self._links_ready(job, [w.worker_id for w in free]):
                return
            start_step = await self.checkpoints.latest(job.job_id)
            request = PlanRequest(
                job_id=job.job_id,
                epoch=job.epoch + 1,
                start_step=start_step,
                graph=model.graph,
                spec=job.spec,
                workers=free,
                figures=self.links.figures(w.worker_id for w in free) if self.links else {},
                compute=self.calibration.model,
            )
            try:
                plan, cut = await asyncio.to_thread(make_plan, request)
            except ValueError as e:
                log.warning("job %s cannot be planned on %d workers: %s", job.job_id, n, e)
                return
            job.waiting_since = 0.0
            self.calibration.new_plan(job.job_id, plan.epoch, cut)
            self.checkpoints.new_plan(job.job_id, plan.epoch, cut)
            job.epoch, job.plan = plan.epoch, plan
            job.state = JobState.STARTING
            job.finished_stages.clear()
            job.drained_stages.clear()
            job.last_checkpoint = start_step
            job.steps_done = start_step
            job.draining_until = 0.0
            job.speaker, job.alone = 0, False
            job.blame = ""
            self.registry.assign(plan.worker_ids, job.job_id, plan.epoch)
            await self.table.save_with_plan(job, plan)
            await self.checkpoints.discard_after(job.job_id, start_step)
            await self.save_workers([self.registry.workers[w] for w in plan.worker_ids])
            await self.table.notify(job)
            on = ", ".join(p.worker_name for p in plan.placements)
            log.info(
                "job %s epoch %d: %d stages x %d replicas on %s, from step %d",
                job.job_id,
                plan.epoch,
                plan.num_stages,
                plan.replicas,
                on,
                start_step,
            )
            await self.events.record(
                job.job_id,
                EventKind.PLANNED,
                f"epoch {plan.epoch}: {plural(plan.num_stages, 'stage')} x "
                f"{plural(plan.replicas, 'replica')} on {on} ({plan.planner}, "
                f"{plan.predicted_step_s:.3f} s/step predicted)",
                epoch=plan.epoch,
                step=start_step,
                planner=plan.planner,
                predicted_step_s=plan.predicted_step_s,
            )
            if start_step:
                await self.events.record(
                    job.job_id,
                    EventKind.RESUMED,
                    f"resumed from the checkpoint of step {start_step}",
                    epoch=plan.epoch,
                    step=start_step,
                )
            try:
                state = await self.checkpoints.resume_state(job.job_id, model, start_step)
                await self._hand_out(job, plan, cut, state)
            except WorkerCallError as e:
                log.warning("job %s epoch %d could not start: %s", job.job_id, plan.epoch, e)
                await self.progress.back_off(e.worker_id, f"could not start a stage: {e}")
                if e.unreachable:
                    w = self.registry.get(e.worker_id)
                    if w is not None and w.alive:
                        w.state = WorkerStatus.LOST
                        await self.save_workers([w])
                await self._fail_attempt(job, str(e))
                return
            except OpDagError as e:
                await self._stop_plan(job)
                job.state, job.error = JobState.FAILED, str(e)
                await self.table.save(job)
                await self.events.record(
                    job.job_id, EventKind.FAILED, f"failed: {e}", epoch=plan.epoch, reason=str(e)
                )
                return
            job.state = JobState.RUNNING
            job.running_since = time.monotonic()
            await self.table.save(job)

    async def _hand_out(
        self, job: Job, plan: Plan, cut: Partition, state: Mapping[str, torch.Tensor]
    ) -> None:
        secret = secrets.token_hex(16)
        routes = stage_routes(cut)
        layers = self._sync_layers(job, plan, cut)
        loads = []
        for placement in plan.placements:
            stage = cut.stages[placement.stage]
            handover = StageHandover(
                job_id=job.job_id,
                epoch=plan.epoch,
                stage=stage,
                plan=plan,
                routes=routes[stage.index],
                spec=job.spec,
                fingerprint=job.fingerprint,
                start_step=plan.start_step,
                secret=secret,
                # Every replica starts from the same state: the checkpoint's one copy.
                tensors=self.checkpoints.stage_tensors(job.job_id, stage, state),
                replica=placement.replica,
                sync_layers=layers.get(stage.index, ()),
            )
            loads.append(self.workers.load_stage(placement.worker_id, placement.address, handover))
        await self.progress.all_answer(loads)
        await self.progress.all_answer(
            self.workers.start(p.worker_id, p.address, job.job_id, plan.epoch)
            for p in plan.placements
        )

    def _sync_layers(self, job: Job, plan: Plan, cut: Partition) -> dict[int, Sequence[SyncLayer]]:
        """partial-local-sgd: per stage, its layers and the iterations that average them,
        scheduled from its parameters and its group's measured links."""
        sync = job.spec.sync
        if sync.kind != "partial-local-sgd" or plan.replicas < 2:
            return {}
        figures = self.links.figures(plan.worker_ids) if self.links else {}
        out: dict[int, Sequence[SyncLayer]] = {}
        for s in cut.stages:
            members = [p.worker_id for p in plan.placements if p.stage == s.index]
            rate = group_link_rate(figures, members)
            out[s.index] = stage_sync_layers(
                s.graph, plan.replicas, sync.period, rate, sync.values
            )[0]
        return out

    # -- stopping --------------------------------------------------------------------------

    async def _stop_plan(self, job: Job) -> None:
        """Tell the plan's live workers to drop the job, and free them."""
        if job.plan is None:
            return
        stops = []
        for p in job.plan.placements:
            w = self.registry.get(p.worker_id)
            if w is not None and w.alive:
                stops.append(self.workers.stop(p.address, job.job_id, job.epoch, drain=False))
        await asyncio.gather(*stops)
        await self._release(job)

    async def _fail_attempt(self, job: Job, reason: str) -> None:
        await self._stop_plan(job)
        # A quarantine broke the plan: say so, not the refused sender's own failure. Read
        # after the stop, since the receiver's report may land while the stages stop.
        if job.blame:
            reason, job.blame = job.blame, ""
        job.recoveries += 1
        if job.steps_done > job.progress_mark:
            job.fruitless, job.progress_mark = 0, job.steps_done
        job.fruitless += 1
        job.error = reason
        if job.fruitless > MAX_FRUITLESS_RECOVERIES:
            job.state = JobState.FAILED
            job.error = (
                f"{MAX_FRUITLESS_RECOVERIES} re-plans in a row made no progress; last: {reason}"
            )
            log.error("job %s failed: %s", job.job_id, job.error)
        else:
            job.state = JobState.RECOVERING
        await self.table.save(job)
        if job.state == JobState.FAILED:
            await self.events.record(
                job.job_id, EventKind.FAILED, f"failed: {job.error}", reason=job.error
            )
        else:
            await self.events.record(
                job.job_id,
                EventKind.REPLANNING,
                f"epoch {job.epoch} broke: {reason}; planning again from the checkpoint of "
                f"step {job.last_checkpoint}",
                epoch=job.epoch,
                step=job.last_checkpoint,
                reason=reason,
            )

    async def recover(self, job: Job, reason: str) -> None:
        """The current plan is broken: stop it; the scheduler plans the job again and it
        resumes from its last complete checkpoint."""
        async with job.busy:
            if job.terminal or job.state not in JOB_PLAN_OUT:
                return
            log.warning(
                "job %s epoch %d: %s; re-planning from step %d",
                job.job_id,
                job.epoch,
                reason,
                job.last_checkpoint,
            )
            await self._fail_attempt(job, reason)

    def recover_later(self, job: Job, reason: str) -> None:
        """`recover` in the background (the caller must not wait on the job's lock)."""
        self.spawn(self.recover(job, reason))

    async def cancel(self, job: Job) -> None:
        """The user cancels the job: stop its plan, and it ends."""
        async with job.busy:
            if job.terminal:
                return
            await self._stop_plan(job)
            job.state = JobState.CANCELLED
            await self.table.save(job)
        log.info("job %s cancelled", job.job_id)
        await self.events.record(job.job_id, EventKind.CANCELLED, "cancelled by its user")

    async def complete(self, job: Job) -> None:
        """Every stage finished the last step: the job is done and its workers free."""
        async with job.busy:
            job.state = JobState.COMPLETED
            job.steps_done = job.spec.steps
            self.calibration.forget(job.job_id)
            self.elastic.forget(job.job_id)
            await self._release(job)
            await self.table.save(job)
        last = f"{job.loss:.4f}" if job.loss is not None else "-"
        log.info("job %s completed: %d steps, last loss %s", job.job_id, job.spec.steps, last)
        await self.events.record(
            job.job_id,
            EventKind.COMPLETED,
            f"completed: {job.spec.steps} steps, last loss {last}",
            step=job.spec.steps,
        )

    async def end_drain(self, job: Job) -> None:
        """Every stage stopped at the drain's step boundary: plan again on the workers
        there are now (without leaving or lost ones, with joining ones), from that step."""
        async with job.busy:
            await self._stop_plan(job)
            job.state, job.draining_until = JobState.RECOVERING, 0.0
            job.recoveries += 1
            await self.table.save(job)
        log.info("job %s drained at step %d; planning it again", job.job_id, job.last_checkpoint)
        await self.events.record(
            job.job_id,
            EventKind.DRAINED,
            f"drained at step {job.last_checkpoint}; planning again",
            epoch=job.epoch,
            step=job.last_checkpoint,
        )
