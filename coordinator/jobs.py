"""The life of a job on the coordinator.

    queued -> starting -> running -> completed
                 ^           |
                 +-- recovering <- (a worker is lost, fails, or leaves)
    any live state -> cancelled | failed

A job is stored before it is acknowledged, and a plan is stored before any worker hears
of it. Training state lives in checkpoints: when a plan breaks, the job is planned again
on the workers that remain (or that joined) and resumes from its last complete checkpoint.
A coordinator restarted on the same store takes every job back: running jobs keep running
if their workers are still there, and are re-planned from their checkpoint if not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import yaml

from coordinator.handover import StageHandover
from coordinator.link_survey import LinkProber
from coordinator.planning.compute import ComputeModel, StageTiming, fit_compute_model
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import Plan, stage_routes
from coordinator.planning.planner import PlanRequest, make_plan, predict
from coordinator.registry import Registry, WorkerState
from coordinator.store import StateStore
from coordinator.worker_client import WorkerCallError, WorkerClient
from opdag import graph_serde
from opdag.capture import capture
from opdag.data import build_source
from opdag.errors import OpDagError
from opdag.ir import CapturedModel
from opdag.optim import optimizer_param_name
from opdag.partition import Partition
from opdag.zoo import build_model, example_batch

log = logging.getLogger("archipelago.coordinator")
T = TypeVar("T")

TERMINAL = ("completed", "failed", "cancelled")
# Re-plans in a row without a single step of progress before a job is declared failed.
MAX_FRUITLESS_RECOVERIES = 5
KEEP_CHECKPOINTS = 2
# How long a job waits for links between free workers to be measured before it is
# planned with what is known; and the steps a stage is profiled for before calibrating.
LINK_WAIT_S = 30.0
PROFILE_STEPS = 3
# The calibrated compute model, kept so a restarted coordinator plans as well at once.
COMPUTE_MODEL_KEY = "compute-model"


class JobError(OpDagError):
    """A request about a job that cannot be met (unknown id, bad spec)."""


class StaleReport(OpDagError):
    """A report from an epoch the job has moved on from."""


@dataclass
class Job:
    """A job as the coordinator holds it."""

    job_id: str
    name: str
    spec: JobSpec
    state: str = "queued"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    epoch: int = 0
    steps_done: int = 0
    last_checkpoint: int = 0
    error: str = ""
    recoveries: int = 0
    fruitless: int = 0
    progress_mark: int = 0
    loss: float | None = None
    step_seconds: float = 0.0
    bytes_per_step: int = 0
    fingerprint: str = ""
    finished_stages: set[int] = field(default_factory=set)
    drained_stages: set[int] = field(default_factory=set)
    # Memory only.
    plan: Plan | None = None
    draining_until: float = 0.0
    running_since: float = 0.0
    waiting_since: float = 0.0
    version: int = 0
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def record(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "state": self.state,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "last_checkpoint": self.last_checkpoint,
            "error": self.error,
            "recoveries": self.recoveries,
            "fruitless": self.fruitless,
            "progress_mark": self.progress_mark,
            "loss": self.loss,
            "step_seconds": self.step_seconds,
            "bytes_per_step": self.bytes_per_step,
            "fingerprint": self.fingerprint,
            "finished_stages": sorted(self.finished_stages),
            "drained_stages": sorted(self.drained_stages),
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Job:
        return cls(
            job_id=r["job_id"],
            name=r["name"],
            spec=parse_job_spec(yaml.safe_dump(r["spec"])),
            state=r["state"],
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            epoch=r["epoch"],
            steps_done=r["steps_done"],
            last_checkpoint=r["last_checkpoint"],
            error=r["error"],
            recoveries=r["recoveries"],
            fruitless=r.get("fruitless", 0),
            progress_mark=r.get("progress_mark", 0),
            loss=r["loss"],
            step_seconds=r["step_seconds"],
            bytes_per_step=r["bytes_per_step"],
            fingerprint=r["fingerprint"],
            finished_stages=set(r["finished_stages"]),
            drained_stages=set(r["drained_stages"]),
        )


@dataclass(frozen=True)
class Progress:
    """One stage's report of one step (decoded from the wire)."""

    worker_id: str
    job_id: str
    epoch: int
    stage: int
    step: int
    loss: float | None
    step_seconds: float
    sent: Mapping[int, int]
    finished: bool
    drained: bool
    error: str
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class PlanReport:
    """How a plan's prediction compares with what its steps measured."""

    measured_step_s: float
    calibrated_step_s: float
    steps_measured: int


class JobManager:
    """All jobs, the scheduler that plans them, and what workers report about them."""

    def __init__(
        self,
        store: StateStore,
        registry: Registry,
        workers: WorkerClient,
        *,
        drain_timeout_s: float = 120.0,
        links: LinkProber | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.workers = workers
        self.links = links
        # The compute model plans are made with, refit from every profiled stage.
        self.compute_model = ComputeModel()
        self._prior_model = self.compute_model  # what the store held at start
        self._timings: dict[str, StageTiming] = {}
        self._compute_samples: dict[tuple[str, int, int], list[float]] = {}
        self._profiled: dict[tuple[str, int, int], int] = {}
        self._stage_flops: dict[tuple[str, int, int], tuple[float, float, int]] = {}
        self.drain_timeout_s = drain_timeout_s
        self.jobs: dict[str, Job] = {}
        self._models: dict[str, CapturedModel] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- helpers ---------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a (blocking) store call off the event loop."""
        return await asyncio.to_thread(fn, *args)

    async def _save(self, job: Job) -> None:
        job.updated_at = time.time()
        await self._io(self.store.put_job, job.record())
        await self._notify(job)

    async def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """The job's stored per-step metrics from `since_step` on."""
        return await self._io(self.store.metrics, job_id, since_step)

    async def save_workers(self, workers: list[WorkerState]) -> None:
        """Store the workers' current records (after the registry changed them)."""
        for w in workers:
            await self._io(self.store.put_worker, w.to_record())

    async def _notify(self, job: Job) -> None:
        job.version += 1
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"no job {job_id!r}")
        return job

    # -- restart ---------------------------------------------------------------------------

    async def restore(self) -> None:
        """Take over what a previous coordinator left in the store."""
        blob = await self._io(self.store.get_blob, COMPUTE_MODEL_KEY)
        if blob is not None:
            try:
                self.compute_model = ComputeModel.from_dict(json.loads(blob))
                self._prior_model = self.compute_model
            except (ValueError, TypeError, AttributeError) as e:
                log.warning("stored compute model unreadable (%s); calibrating afresh", e)
        self.registry.load(await self._io(self.store.list_workers))
        for record in await self._io(self.store.list_jobs):
            job = Job.from_record(record)
            self.jobs[job.job_id] = job
            plan = await self._io(self.store.get_plan, job.job_id)
            if plan is not None:
                job.plan = Plan.from_dict(plan)
            if job.state == "running" and job.plan is not None:
                # Its workers may still be training: adopt them; if they are gone, the
                # lost-worker check re-plans the job from its checkpoint.
                job.running_since = time.monotonic()
                log.info(
                    "adopted running job %s (epoch %d, step %d)",
                    job.job_id,
                    job.epoch,
                    job.steps_done,
                )
            elif job.state in ("starting", "running"):
                job.state = "recovering"
                await self._save(job)
        # Workers the old coordinator had on jobs that are no longer running are free.
        for w in self.registry.workers.values():
            held = self.jobs.get(w.job_id)
            if w.job_id and (held is None or held.state != "running" or held.epoch != w.epoch):
                self.registry.release((w.worker_id,), w.job_id)

    # -- submission and user requests ------------------------------------------------------

    async def submit(self, spec_yaml: str) -> Job:
        """Validate a spec, capture its model, store the job; then it waits for workers."""
        spec = parse_job_spec(spec_yaml)
        job = Job(job_id=uuid.uuid4().hex[:10], name=spec.name, spec=spec)
        try:
            model, fingerprint = await asyncio.to_thread(self._prepare, spec)
        except (RuntimeError, TypeError, ValueError, OverflowError, MemoryError) as e:
            # The spec passed validation but torch cannot build the model it describes (a
            # size beyond memory or beyond int64): refuse the job, do not crash the call.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise JobError(
                f"model: {spec.model.zoo} cannot be built with these args: {reason}"
            ) from None
        job.fingerprint = fingerprint
        await self._io(
            self.store.put_blob, f"job/{job.job_id}/model", graph_serde.encode_model(model)
        )
        self._models[job.job_id] = model
        self.jobs[job.job_id] = job
        await self._save(job)
        log.info(
            "job %s (%s) submitted: %s, %d steps", job.job_id, spec.name, spec.model.zoo, spec.steps
        )
        return job

    @staticmethod
    def _prepare(spec: JobSpec) -> tuple[CapturedModel, str]:
        """Capture the job's model and fingerprint its data (in a thread: both take time)."""
        args = spec.model.args_dict()
        model = build_model(spec.model.zoo, args, seed=spec.seed)
        example = example_batch(spec.model.zoo, args, spec.data.micro_batch_size, device="meta")
        captured = capture(model, example, name=spec.model.zoo)
        source = build_source(spec.data, context=spec.context())
        return captured, source.fingerprint

    async def model_of(self, job: Job) -> CapturedModel:
        model = self._models.get(job.job_id)
        if model is None:
            blob = await self._io(self.store.get_blob, f"job/{job.job_id}/model")
            if blob is None:
                raise JobError(f"job {job.job_id}: its model is missing from the store")
            model = await asyncio.to_thread(graph_serde.decode_model, blob)
            self._models[job.job_id] = model
        return model

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        async with job.busy:
            if job.terminal:
                return job
            await self._stop_plan(job)
            job.state = "cancelled"
            await self._save(job)
        log.info("job %s cancelled", job_id)
        return job

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

    # -- scheduling ------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass of the scheduler: notice lost workers, plan waiting jobs."""
        lost = self.registry.expire()
        if lost:
            await self.save_workers(lost)
        for w in lost:
            log.warning(
                "worker %s (%s) %s",
                w.name,
                w.worker_id,
                "left" if w.state == "left" else "stopped heart-beating: lost",
            )
            job = self.jobs.get(w.job_id)
            if job is not None and not job.terminal and job.epoch == w.epoch:
                if w.state == "left" and job.draining_until:
                    continue  # it drained and went; the drain finishes without it
                self._spawn(self.recover(job, f"worker {w.name} was lost"))
        now = time.monotonic()
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at):
            if job.busy.locked():
                continue
            if job.state in ("queued", "recovering"):
                await self._launch(job)
            elif job.draining_until and now > job.draining_until:
                self._spawn(self.recover(job, "the drain did not finish in time"))

    async def _launch(self, job: Job) -> None:
        async with job.busy:
            if job.state not in ("queued", "recovering"):
                return
            free = self.registry.free()
            want = job.spec.parallel.stages
            model = await self.model_of(job)
            if want is None:
                n = min(len(free), len(model.graph.compute_nodes))
            else:
                n = want if len(free) >= want else 0
            if n == 0:
                return
            if not self._links_ready(job, [w.worker_id for w in free]):
                return
            start_step = await self._io(self.store.latest_checkpoint, job.job_id) or 0
            request = PlanRequest(
                job_id=job.job_id,
                epoch=job.epoch + 1,
                start_step=start_step,
                graph=model.graph,
                spec=job.spec,
                workers=free,
                figures=self.links.figures(w.worker_id for w in free) if self.links else {},
                compute=self.compute_model,
            )
            try:
                plan, cut = await asyncio.to_thread(make_plan, request)
            except ValueError as e:
                log.warning("job %s cannot be planned on %d workers: %s", job.job_id, n, e)
                return
            job.waiting_since = 0.0
            self._forget_profile(job.job_id)
            for stage in cut.stages:
                g = stage.graph
                self._stage_flops[(job.job_id, plan.epoch, stage.index)] = (
                    g.total("fwd_flops"),
                    g.total("bwd_flops"),
                    len(g.compute_nodes),
                )
            job.epoch, job.plan = plan.epoch, plan
            job.state = "starting"
            job.finished_stages.clear()
            job.drained_stages.clear()
            job.last_checkpoint = start_step
            job.steps_done = start_step
            job.draining_until = 0.0
            self.registry.assign(plan.worker_ids, job.job_id, plan.epoch)
            job.updated_at = time.time()
            await self._io(self.store.put_job_and_plan, job.record(), plan.to_dict())
            await self._io(self.store.discard_checkpoints_after, job.job_id, start_step)
            await self.save_workers([self.registry.workers[w] for w in plan.worker_ids])
            await self._notify(job)
            log.info(
                "job %s epoch %d: %d stages on %s, from step %d",
                job.job_id,
                plan.epoch,
                plan.num_stages,
                ", ".join(p.worker_name for p in plan.placements),
                start_step,
            )
            try:
                state = await self._resume_state(job, model, start_step)
                await self._hand_out(job, plan, cut, state)
            except WorkerCallError as e:
                log.warning("job %s epoch %d could not start: %s", job.job_id, plan.epoch, e)
                if e.unreachable:
                    w = self.registry.get(e.worker_id)
                    if w is not None and w.alive:
                        w.state = "lost"
                        await self.save_workers([w])
                await self._fail_attempt(job, str(e))
                return
            except OpDagError as e:
                await self._stop_plan(job)
                job.state, job.error = "failed", str(e)
                await self._save(job)
                return
            job.state = "running"
            job.running_since = time.monotonic()
            await self._save(job)

    async def _resume_state(
        self, job: Job, model: CapturedModel, step: int
    ) -> dict[str, torch.Tensor]:
        if step == 0:
            return dict(model.state)
        parts = await self._io(self.store.checkpoint_parts, job.job_id, step)
        state: dict[str, torch.Tensor] = {}
        for part in parts:
            state.update(
                await asyncio.to_thread(graph_serde.decode_state, part, f"checkpoint {step}")
            )
        return state

    async def _hand_out(
        self, job: Job, plan: Plan, cut: Partition, state: Mapping[str, torch.Tensor]
    ) -> None:
        secret = secrets.token_hex(16)
        routes = stage_routes(cut)
        loads = []
        for placement, stage in zip(plan.placements, cut.stages, strict=True):
            names = [p.name for p in stage.graph.params]
            wanted = set(names)
            names += sorted(k for k in state if optimizer_param_name(k) in wanted)
            missing = [n for n in names if n not in state]
            if missing:
                raise JobError(f"job {job.job_id}: the checkpoint lacks {missing[:3]}")
            tensors = [state[n] for n in names]
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
                tensors=list(zip(names, tensors, strict=True)),
            )
            loads.append(self.workers.load_stage(placement.worker_id, placement.address, handover))
        await asyncio.gather(*loads)
        await asyncio.gather(
            *(
                self.workers.start(p.worker_id, p.address, job.job_id, plan.epoch)
                for p in plan.placements
            )
        )

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
        changed = self.registry.release(job.plan.worker_ids, job.job_id)
        await self.save_workers(changed)

    async def _fail_attempt(self, job: Job, reason: str) -> None:
        await self._stop_plan(job)
        job.recoveries += 1
        if job.steps_done > job.progress_mark:
            job.fruitless, job.progress_mark = 0, job.steps_done
        job.fruitless += 1
        job.error = reason
        if job.fruitless > MAX_FRUITLESS_RECOVERIES:
            job.state = "failed"
            job.error = (
                f"{MAX_FRUITLESS_RECOVERIES} re-plans in a row made no progress; last: {reason}"
            )
            log.error("job %s failed: %s", job.job_id, job.error)
        else:
            job.state = "recovering"
        await self._save(job)

    async def recover(self, job: Job, reason: str) -> None:
        """The current plan is broken: stop it; the scheduler plans the job again and it
        resumes from its last complete checkpoint."""
        async with job.busy:
            if job.terminal or job.state not in ("running", "starting"):
                return
            log.warning(
                "job %s epoch %d: %s; re-planning from step %d",
                job.job_id,
                job.epoch,
                reason,
                job.last_checkpoint,
            )
            await self._fail_attempt(job, reason)

    # -- what workers report ----------------------------------------------------------------

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

    # -- calibration -----------------------------------------------------------------------

    def _profile(self, job: Job, p: Progress) -> None:
        """Record a stage's measured compute time; once a stage has a few steps of this
        plan, refit the compute model every later plan (and prediction) uses."""
        plan = job.plan
        if plan is None or p.compute_seconds <= 0 or p.stage >= plan.num_stages:
            return
        placement = plan.placements[p.stage]
        key = (job.job_id, plan.epoch, p.stage)
        if p.step == plan.start_step:
            return  # the first step of a plan warms up: leave it out
        seen = self._compute_samples.setdefault(key, [])
        seen.append(p.compute_seconds)
        del seen[: -4 * PROFILE_STEPS]
        n = self._profiled[key] = self._profiled.get(key, 0) + 1
        # Refit once a stage has a few steps, then every tenth step: not on every report.
        if n < PROFILE_STEPS or (n - PROFILE_STEPS) % 10:
            return
        w = self.registry.get(placement.worker_id)
        if w is None or w.gflops <= 0:
            return
        stage = self._stage_flops.get(key)
        if stage is None:
            return
        fwd, bwd, nodes = stage
        per_mb = statistics.median(seen) / job.spec.data.micro_batches
        share = fwd / (fwd + bwd) if fwd + bwd > 0 else 0.5
        self._timings[placement.worker_id] = StageTiming(
            placement.worker_id, w.gflops, fwd, bwd, nodes, per_mb * share, per_mb * (1 - share)
        )
        self.compute_model = fit_compute_model(
            list(self._timings.values()), prior=self._prior_model
        )
        blob = json.dumps(self.compute_model.to_dict()).encode()
        self._spawn(self._io(self.store.put_blob, COMPUTE_MODEL_KEY, blob))

    def _forget_profile(self, job_id: str) -> None:
        """Drop the per-stage profiling state of a job's earlier plans (the fitted model
        keeps what was learnt from them)."""
        for table in (self._compute_samples, self._profiled, self._stage_flops):
            for key in [k for k in table if k[0] == job_id]:
                del table[key]

    async def _calibrated_prediction(self, job: Job) -> float:
        """The plan's step time predicted again with the compute model as calibrated now
        (0 before any stage of any plan has been profiled)."""
        plan = job.plan
        if plan is None or self.compute_model == ComputeModel():
            return 0.0  # nothing calibrated yet, here or by a coordinator before
        model = await self.model_of(job)
        speeds = {
            pl.worker_id: (w.gflops if (w := self.registry.get(pl.worker_id)) else 0.0)
            for pl in plan.placements
        }
        figures = self.links.figures(speeds) if self.links else {}
        return await asyncio.to_thread(
            predict, plan, model.graph, job.spec, speeds, figures, self.compute_model
        )

    def current_job(self, job_id: str, epoch: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise StaleReport(f"no job {job_id!r}")
        if job.epoch != epoch or job.state not in ("starting", "running"):
            raise StaleReport(f"job {job_id} is at epoch {job.epoch} ({job.state}), not {epoch}")
        return job

    async def on_progress(self, p: Progress) -> None:
        job = self.current_job(p.job_id, p.epoch)
        if p.error:
            self._spawn(self.recover(job, f"stage {p.stage} failed: {p.error}"))
            return
        if p.finished or p.drained:
            (job.finished_stages if p.finished else job.drained_stages).add(p.stage)
            if p.drained and p.stage == 0 and job.plan is not None:
                # Stage 0 chose the boundary; every other stage stops at the same one.
                for placement in job.plan.placements[1:]:
                    await self.workers.stop(
                        placement.address, job.job_id, job.epoch, drain=True, steps_done=p.step + 1
                    )
            await self._check_end(job)
            return
        self._profile(job, p)
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
        await self._io(self.store.put_metric, job.job_id, p.step, p.stage, record)
        if p.loss is not None:
            metrics = await self._io(self.store.metrics, job.job_id, p.step)
            job.bytes_per_step = sum(
                int(m.get("bytes", 0))
                for m in metrics
                if m["step"] == p.step and m.get("epoch") == p.epoch
            )
            await self._save(job)

    async def _check_end(self, job: Job) -> None:
        assert job.plan is not None
        stages = set(range(job.plan.num_stages))
        if job.finished_stages >= stages:
            async with job.busy:
                job.state = "completed"
                job.steps_done = job.spec.steps
                self._forget_profile(job.job_id)
                changed = self.registry.release(job.plan.worker_ids, job.job_id)
                await self.save_workers(changed)
                await self._save(job)
            log.info(
                "job %s completed: %d steps, last loss %s",
                job.job_id,
                job.spec.steps,
                f"{job.loss:.4f}" if job.loss is not None else "-",
            )
        elif job.drained_stages >= stages:
            async with job.busy:
                await self._stop_plan(job)
                job.state, job.draining_until = "recovering", 0.0
                job.recoveries += 1
                await self._save(job)
            log.info(
                "job %s drained at step %d; re-planning without the leaving workers",
                job.job_id,
                job.last_checkpoint,
            )
        else:
            await self._save(job)

    async def on_checkpoint(
        self,
        *,
        job_id: str,
        epoch: int,
        stage: int,
        num_stages: int,
        step: int,
        tensors: Mapping[str, torch.Tensor],
    ) -> None:
        job = self.current_job(job_id, epoch)
        assert job.plan is not None
        if num_stages != job.plan.num_stages or stage >= num_stages:
            raise JobError(f"checkpoint of stage {stage}/{num_stages} does not fit the plan")
        if not job.plan.start_step < step <= job.spec.steps:
            raise JobError(f"checkpoint step {step} is outside this plan's steps")
        model = await self.model_of(job)
        allowed = {p.name for p in model.graph.params}
        for name in tensors:
            owner = optimizer_param_name(name) or name
            if owner not in allowed:
                raise JobError(f"checkpoint tensor {name!r} is not part of the model")
        blob = await asyncio.to_thread(graph_serde.encode_state, tensors)
        complete = await self._io(
            self.store.put_checkpoint_part, job_id, step, stage, num_stages, blob
        )
        if complete:
            job.last_checkpoint = max(job.last_checkpoint, step)
            await self._io(self.store.prune_checkpoints, job_id, KEEP_CHECKPOINTS)
            await self._save(job)
            log.info("job %s: checkpoint at step %d", job_id, step)

    def on_heartbeat(self, w: WorkerState) -> list[str]:
        """Jobs this worker should drop; and notice a plan that broke without a word."""
        job_id, epoch, _step, state = w.reported
        stop: list[str] = []
        if job_id and state in ("loaded", "running") and (job_id != w.job_id or epoch != w.epoch):
            stop.append(job_id)
        job = self.jobs.get(w.job_id)
        if (
            job is not None
            and job.state == "running"
            and job.epoch == w.epoch
            and time.monotonic() - job.running_since > 3 * self.registry.timeout_s
            and (job_id != w.job_id or epoch != w.epoch or state in ("failed", "aborted"))
        ):
            self._spawn(self.recover(job, f"worker {w.name} no longer runs its stage ({state})"))
        return stop

    async def on_leave(self, w: WorkerState) -> None:
        """A worker asked to leave: drain its job (checkpoint at the next step boundary,
        then re-plan without it); an idle worker simply leaves."""
        w.leaving = True
        job = self.jobs.get(w.job_id)
        if job is None or job.state != "running" or job.plan is None:
            if w.state in ("idle", "busy") and not w.job_id:
                w.state = "left"
            await self.save_workers([w])
            return
        await self.save_workers([w])
        log.info("worker %s leaves: draining job %s", w.name, job.job_id)
        job.draining_until = time.monotonic() + self.drain_timeout_s
        head = job.plan.placements[0]
        await self.workers.stop(head.address, job.job_id, job.epoch, drain=True)
        await self._notify(job)

    async def plan_report(self, job: Job) -> PlanReport:
        """The job's plan against its measured steps: the mean step time (the interval
        between loss reports, the first step of the plan left out as warm-up) and the
        prediction re-made with compute times calibrated on the steps measured."""
        plan = job.plan
        assert plan is not None
        records = await self._io(self.store.metrics, job.job_id, plan.start_step)
        mine = [r for r in records if r.get("epoch") == plan.epoch]
        times = sorted((r["step"], r["at"]) for r in mine if "loss" in r and "at" in r)[1:]
        measured = 0.0
        if len(times) >= 2:
            measured = (times[-1][1] - times[0][1]) / (times[-1][0] - times[0][0])
        calibrated = await self._calibrated_prediction(job)
        return PlanReport(measured, calibrated, max(len(times) - 1, 0))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
