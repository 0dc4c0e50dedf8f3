"""The coordinator's jobs, as users and workers see them.

`JobManager` takes what users ask (submit, cancel, watch) and what workers report (steps,
checkpoints, heart-beats, leaving), and hands every change of state to the scheduler,
`coordinator.job_lifecycle.JobLifecycle`. The pieces it is built from each live in their
own module: the job record (`job_record`), the jobs held and stored (`job_table`),
checkpoints (`checkpoints`), step metrics (`step_metrics`) and the compute model's
calibration (`calibration`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from coordinator.calibration import ComputeCalibration
from coordinator.checkpoints import Checkpoints
from coordinator.datasets import Datasets, check_dataset_fits, graph_example
from coordinator.events import CLUSTER, EventKind, EventLog
from coordinator.job_lifecycle import JobLifecycle
from coordinator.job_record import Job, JobError, PlanReport, Progress, StaleReport
from coordinator.job_table import JobTable
from coordinator.limits import CoordinatorLimits
from coordinator.link_survey import LinkProber
from coordinator.model_upload import (
    ModelJobUpload,
    check_uploaded,
    max_upload_bytes,
    read_model_bytes,
)
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.quarantine import Quarantine
from coordinator.registry import Registry, WorkerState
from coordinator.replica_metrics import WINDOW_STEPS
from coordinator.spot_checks import SpotChecks
from coordinator.states import STAGE_ACTIVE, STAGE_BROKEN, JobState, WorkerStatus
from coordinator.step_metrics import StepMetrics
from coordinator.store import StateStore
from coordinator.validation import CheckpointValidation
from coordinator.worker_client import WorkerClient
from opdag.capture import capture
from opdag.data import build_source
from opdag.ir import CapturedModel
from opdag.zoo import build_model, data_kind, example_batch, model_config
from opdag.zoo.gpt import VOCAB as GPT_VOCAB

__all__ = ["Job", "JobError", "JobManager", "PlanReport", "Progress", "StaleReport"]

log = logging.getLogger("archipelago.coordinator")


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
        self.drain_timeout_s = drain_timeout_s
        self.table = JobTable(store)
        self.checkpoints = Checkpoints(store)
        self.step_metrics = StepMetrics(store)
        # The timelines of every job and of the cluster, and the checkpoints' held-out loss.
        self.events = EventLog(store)
        # Users' own datasets (`coordinator.datasets`), which jobs may name as their data.
        self.datasets = Datasets(store)
        self.validation = CheckpointValidation(self.checkpoints, self.events, self.datasets)
        # Reports of refused values and implausible losses, weighed (`coordinator.quarantine`).
        self.quarantine = Quarantine(store, registry, self.events)
        # The coordinator's recomputations of random micro-batches (`coordinator.spot_checks`).
        self.spot_checks = SpotChecks(
            workers,
            self.events,
            model_of=self.model_of,
            accuse=self._on_suspects,
            withheld=self._withheld_evidence,
            spawn=lambda c: self.lifecycle.spawn(c),
        )
        # The compute model plans are made with, refit from every profiled stage.
        self.calibration = ComputeCalibration(store, registry, links)
        self.lifecycle = JobLifecycle(
            store=store,
            registry=registry,
            workers=workers,
            table=self.table,
            checkpoints=self.checkpoints,
            calibration=self.calibration,
            links=links,
            events=self.events,
            drain_timeout_s=drain_timeout_s,
        )

    @property
    def jobs(self) -> dict[str, Job]:
        """Every job, by id."""
        return self.table.jobs

    def get(self, job_id: str) -> Job:
        """The job, or JobError when there is none by that id."""
        return self.table.get(job_id)

    def current_job(self, job_id: str, epoch: int) -> Job:
        """The job a worker reports on, if the report is of its current plan; else
        StaleReport."""
        return self.table.current_job(job_id, epoch)

    async def model_of(self, job: Job) -> CapturedModel:
        """The job's captured model."""
        return await self.table.model_of(job)

    async def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """The job's stored per-step metrics from `since_step` on."""
        return await self.step_metrics.since(job_id, since_step)

    async def recent_metrics(self, job: Job) -> list[dict[str, Any]]:
        """The stored records of the job's last steps, enough for its replica and group
        figures (empty for a plan of one pipeline, which has none)."""
        if job.plan is None or job.plan.replicas < 2:
            return []
        return await self.metrics(job.job_id, max(0, job.steps_done - WINDOW_STEPS - 2))

    async def save_workers(self, workers: list[WorkerState]) -> None:
        """Store the workers' current records (after the registry changed them)."""
        await self.lifecycle.save_workers(workers)

    async def restore(self) -> None:
        """Take over what a previous coordinator left in the store."""
        await self.quarantine.load()
        await self.lifecycle.restore()

    async def tick(self) -> None:
        """One pass of the scheduler: notice lost workers, plan waiting jobs."""
        await self.lifecycle.tick()

    async def close(self) -> None:
        """Cancel the background work (recoveries, stores of the compute model)."""
        await self.lifecycle.close()

    # -- what users ask --------------------------------------------------------------------

    # This coordinator's bounds (coordinator.main sets the configured ones; the job's are
    # checked in `submit`, before its model is built).
    limits: CoordinatorLimits = CoordinatorLimits()

    async def submit(self, spec_yaml: str) -> Job:
        """Validate a spec, capture its model, store the job; then it waits for workers."""
        # Parsed off the event loop: even a spec at the bounds never holds up heart-beats.
        spec = await asyncio.to_thread(parse_job_spec, spec_yaml, self.limits.spec)
        if spec.model.uploaded:
            raise JobError(
                f"model: {spec.model.label} is the user's own; `archipelago submit` captures "
                "it and uploads it with the job (SubmitModelJob)"
            )
        job = Job(job_id=uuid.uuid4().hex[:10], name=spec.name, spec=spec)
        dataset_sha = await self._zoo_dataset(spec) if spec.data.dataset else ""
        try:
            model, fingerprint = await asyncio.to_thread(self._prepare, spec)
        except (RuntimeError, TypeError, ValueError, OverflowError, MemoryError) as e:
            # The spec passed validation but torch cannot build the model it describes (a
            # size beyond memory or beyond int64): refuse the job, do not crash the call.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise JobError(
                f"model: {spec.model.label} cannot be built with these args: {reason}"
            ) from None
        job.fingerprint = dataset_sha or fingerprint
        await self._accept(job, model)
        return job

    async def _accept(
        self, job: Job, model: CapturedModel, export_names: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Store a checked job with its model; then it waits for workers."""
        spec = job.spec
        await self.table.add(job, model, export_names)
        await self.events.record(
            job.job_id,
            EventKind.SUBMITTED,
            f"submitted: {spec.model.label}, {spec.steps} steps",
            steps=spec.steps,
        )
        log.info(
            "job %s (%s) submitted: %s, %d steps",
            job.job_id,
            spec.name,
            spec.model.label,
            spec.steps,
        )

    # A user's own model, captured by the submitter (`coordinator.model_upload`).
    async def submit_uploaded(self, upload: ModelJobUpload, chunks: AsyncIterator[bytes]) -> Job:
        """Validate a spec and its uploaded model (read from `chunks`), store the job."""
        spec = await asyncio.to_thread(parse_job_spec, upload.spec_yaml, self.limits.spec)
        if not spec.model.uploaded:
            raise JobError(f"model: {spec.model.label} is a zoo model; submit it with SubmitJob")
        limit = max_upload_bytes(self.limits.spec)
        blob = await read_model_bytes(chunks, upload.model_bytes, limit)
        names = upload.export_names
        manifest = await self.datasets.resolve(spec.data.dataset) if spec.data.dataset else None
        model = await asyncio.to_thread(
            check_uploaded, spec, blob, names, self.limits.spec, manifest
        )
        job = Job(job_id=uuid.uuid4().hex[:10], name=spec.name, spec=spec)
        if manifest is not None:  # users' own data: pinned to the manifest checked against
            example = graph_example(model.graph)
            check_dataset_fits(manifest, example, vocab=None, context=spec.context())
            job.fingerprint = manifest.sha256
        else:
            source = await asyncio.to_thread(build_source, spec.data, context=spec.context())
            job.fingerprint = source.fingerprint
        await self._accept(job, model, names)
        return job

    @staticmethod
    def _prepare(spec: JobSpec) -> tuple[CapturedModel, str]:
        """Capture the job's model and fingerprint its data (in a thread: both take time)."""
        zoo, args = spec.model.zoo, spec.model.args_dict()
        assert zoo is not None  # `submit` takes zoo models only
        model = build_model(zoo, args, seed=spec.seed)
        example = example_batch(zoo, args, spec.data.micro_batch_size, device="meta")
        captured = capture(model, example, name=zoo)
        if spec.data.dataset:  # fingerprinted by its manifest (`_zoo_dataset`)
            return captured, ""
        source = build_source(spec.data, context=spec.context())
        return captured, source.fingerprint

    # -- users' own data: the dataset a job names, checked against its model and pinned --

    async def _zoo_dataset(self, spec: JobSpec) -> str:
        """The SHA-256 of the dataset a zoo model's job names, once it is found to fit."""
        zoo, args = spec.model.zoo, spec.model.args_dict()
        assert zoo is not None
        example = example_batch(zoo, args, 1, device="meta")
        # The zoo's text models are byte-level (gpt's vocab); its image models classify.
        vocab = GPT_VOCAB if data_kind(zoo) == "text" else None
        classes = getattr(model_config(zoo, args), "num_classes", None)
        below = {"labels": classes} if isinstance(classes, int) else None
        manifest = await self.datasets.resolve(spec.data.dataset)
        context = spec.context()
        check_dataset_fits(manifest, example, vocab=vocab, context=context, below=below)
        return manifest.sha256

    async def cancel(self, job_id: str) -> Job:
        """Stop the job's plan; it ends cancelled (an ended job is left as it is)."""
        job = self.get(job_id)
        await self.lifecycle.cancel(job)
        return job

    def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then again at every change, until it ends."""
        return self.table.watch(job_id)

    async def plan_report(self, job: Job) -> PlanReport:
        """The job's plan against its measured steps: the mean step time and the
        prediction re-made with compute times calibrated on the steps measured."""
        plan = job.plan
        assert plan is not None
        calibrated = 0.0  # nothing calibrated yet, here or by a coordinator before
        if self.calibration.calibrated:
            model = await self.model_of(job)
            calibrated = await self.calibration.predicted_step_s(plan, model.graph, job.spec)
        return await self.step_metrics.plan_report(job.job_id, plan, calibrated)

    # -- what workers report ---------------------------------------------------------------

    async def on_progress(self, p: Progress) -> None:
        if p.suspects:
            await self._on_suspects(p)
            return
        job = self.current_job(p.job_id, p.epoch)
        if job.dropped(p.worker_id):
            return  # a replica the job no longer has (`coordinator.elastic`)
        if bad_loss := self.quarantine.loss_problem(job, p):
            await self.step_metrics.record(job, p)  # shown as reported (`nan` included)
            text = await self.quarantine.own_values(job, p.worker_id, bad_loss, for_good=False)
            self.lifecycle.recover_later(job, text)
            return
        if p.error:
            self.lifecycle.recover_later(job, f"stage {p.stage} failed: {p.error}")
            return
        if p.finished or p.drained:
            if not job.speaks(p.worker_id):
                return  # only the speaking replica ends or drains a stage
            (job.finished_stages if p.finished else job.drained_stages).add(p.stage)
            if p.drained and p.stage == 0 and job.plan is not None:
                # Stage 0 chose the boundary; every other stage stops at the same one.
                for placement in job.plan.placements:
                    if placement.worker_id == p.worker_id or job.dropped(placement.worker_id):
                        continue
                    await self.workers.stop(
                        placement.address,
                        job.job_id,
                        job.epoch,
                        drain=True,
                        steps_done=p.step + 1,
                        alone=job.alone,
                    )
            await self._check_end(job)
            return
        # The compute model is calibrated on replica 0's workers (the plan's first placements).
        if job.replica_of(p.worker_id) == 0 and self.calibration.observe(job, p):
            self.lifecycle.spawn(self.calibration.save())
        if await self.step_metrics.record(job, p):
            await self.table.save(job)
        self.spot_checks.observe(job, p)

    async def _on_suspects(self, p: Progress) -> None:
        """A stage refused values: exclude whom it blames, and re-plan without them. Heard
        while its plan is out or already broken (the refused sender's own failure may
        have come first), not once the job was planned again."""
        job = self.table.jobs.get(p.job_id)
        if job is None or job.epoch != p.epoch or job.terminal or job.dropped(p.worker_id):
            raise StaleReport(f"no plan {p.epoch} of job {p.job_id!r} to report suspects of")
        verdicts = await self.quarantine.hear(job, p)
        if verdicts:  # `hear` set job.blame, the reason the re-plan gives
            job.error = "; ".join(v.text for v in verdicts)
            await self.table.save(job)
            self.lifecycle.recover_later(job, job.error)

    async def _withheld_evidence(self, job: Job, worker_id: str, evidence: str) -> None:
        """A stage kept its spot checks' evidence back: back its worker off and re-plan."""
        if job.terminal or job.dropped(worker_id):
            return
        text = await self.quarantine.own_values(
            job, worker_id, evidence, for_good=False, kind=EventKind.SUSPECTED
        )
        self.lifecycle.recover_later(job, text)

    async def _check_end(self, job: Job) -> None:
        assert job.plan is not None
        stages = set(range(job.plan.num_stages))
        if job.finished_stages >= stages:
            await self.lifecycle.complete(job)
        elif job.drained_stages >= stages:
            await self.lifecycle.end_drain(job)
        else:
            await self.table.save(job)

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
        self.checkpoints.check_fits(job, stage=stage, num_stages=num_stages, step=step)
        model = await self.model_of(job)
        complete = await self.checkpoints.accept(
            job_id, model, stage=stage, num_stages=num_stages, step=step, tensors=tensors
        )
        if complete:
            job.last_checkpoint = max(job.last_checkpoint, step)
            await self.checkpoints.prune(job_id)
            await self.table.save(job)
            log.info("job %s: checkpoint at step %d", job_id, step)
            await self.events.record(
                job_id, EventKind.CHECKPOINT, f"checkpoint at step {step}", step=step
            )
            self.lifecycle.spawn(self._validate(job, model, step))

    async def _validate(self, job: Job, model: CapturedModel, step: int) -> None:
        """Evaluate a complete checkpoint on held-out batches; the job shows the newest."""
        for at, loss in await self.validation.evaluate(job, model, step):
            if not math.isfinite(loss):  # recovery goes back to an earlier one
                await self.checkpoints.unvalidate(job.job_id, at, f"held-out loss {loss}")
            if at >= job.val_step:
                job.val_loss, job.val_step = loss, at
                await self.table.save(job)

    def on_heartbeat(self, w: WorkerState) -> list[str]:
        """Jobs this worker should drop; and notice a plan that broke without a word."""
        job_id, epoch, _step, state = w.reported
        stop: list[str] = []
        if job_id and state in STAGE_ACTIVE and (job_id != w.job_id or epoch != w.epoch):
            stop.append(job_id)
        job = self.jobs.get(w.job_id)
        if (
            job is not None
            and job.state == JobState.RUNNING
            and job.epoch == w.epoch
            and time.monotonic() - job.running_since > 3 * self.registry.timeout_s
            and (job_id != w.job_id or epoch != w.epoch or state in STAGE_BROKEN)
        ):
            self.lifecycle.recover_later(job, f"worker {w.name} no longer runs its stage ({state})")
        return stop

    async def on_leave(self, w: WorkerState) -> None:
        """A worker asked to leave: drain its job (checkpoint at the next step boundary,
        then re-plan without it); an idle worker simply leaves."""
        w.leaving = True
        job = self.jobs.get(w.job_id)
        if job is None or job.state != JobState.RUNNING or job.plan is None:
            if w.alive and not w.job_id:
                w.state = WorkerStatus.LEFT
            await self.save_workers([w])
            await self.events.record(
                CLUSTER, EventKind.LEFT, f"worker {w.name} left", worker_id=w.worker_id
            )
            return
        await self.save_workers([w])
        log.info("worker %s leaves: draining job %s", w.name, job.job_id)
        await self.events.record(
            CLUSTER, EventKind.LEAVING, f"worker {w.name} leaves", worker_id=w.worker_id
        )
        await self.events.record(
            job.job_id,
            EventKind.REPLANNING,
            f"worker {w.name} leaves: draining at the next step boundary, then planning again",
            epoch=job.epoch,
            worker_id=w.worker_id,
            worker_name=w.name,
            reason="a worker leaves",
        )
        job.draining_until = time.monotonic() + self.drain_timeout_s
        head = job.plan.placements[0]
        await self.workers.stop(head.address, job.job_id, job.epoch, drain=True)
        await self.table.notify(job)
