"""The coordinator's gRPC servicer: check the caller, decode, call the job manager, encode.

Every call needs the join token. A malformed or inconsistent request gets an error status
that names the problem and changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from coordinator.jobs import JobError, JobManager, StaleReport
from coordinator.registry import Registry
from coordinator.serde import (
    job_info_pb,
    link_list_pb,
    plan_info_pb,
    progress_from_pb,
    worker_info_pb,
)
from opdag.errors import OpDagError
from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.rpc import (
    ADDRESS_PATTERN,
    MAX_DETAILS_CHARS,
    Network,
    address_in_networks,
    require_token,
)
from proto.tensor_stream import TensorAssembler

log = logging.getLogger("archipelago.coordinator")

MAX_SPEC_BYTES = 64 << 10


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message[:MAX_DETAILS_CHARS])
    raise AssertionError("abort returns only by raising")


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """gRPC face of the job manager and the worker registry."""

    def __init__(
        self,
        manager: JobManager,
        registry: Registry,
        *,
        token: str,
        heartbeat_s: float,
        worker_networks: tuple[Network, ...] = (),
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.worker_networks = worker_networks

    async def _guard(self, context: grpc.aio.ServicerContext) -> None:
        await require_token(context, self.token)

    # -- workers ---------------------------------------------------------------------------

    async def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RegisterReply:
        await self._guard(context)
        if not 0 < len(request.name) <= 100 or not request.name.isprintable():
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "worker name must be 1-100 printable characters",
            )
        if not ADDRESS_PATTERN.match(request.address):
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"worker address {request.address[:80]!r} is not HOST:PORT",
            )
        if not address_in_networks(request.address, self.worker_networks):
            await _abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"worker address {request.address[:80]!r} is outside the networks this "
                "coordinator accepts workers from (--worker-networks)",
            )
        r = request.resources
        if not 0 <= r.gflops < 1e9 or len(r.device) > 32:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "implausible worker resources")
        w = self.registry.register(
            name=request.name,
            address=request.address,
            gflops=r.gflops,
            memory_bytes=r.memory_bytes,
            device=r.device or "cpu",
            threads=r.threads,
            worker_id=request.worker_id[:64],
        )
        await self.manager.save_workers([w])
        log.info(
            "worker %s (%s) at %s joined: %.1f GFLOP/s", w.name, w.worker_id, w.address, w.gflops
        )
        return coordinator_pb2.RegisterReply(
            worker_id=w.worker_id, heartbeat_interval_s=self.heartbeat_s
        )

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatReply:
        await self._guard(context)
        w = self.registry.heartbeat(
            request.worker_id, (request.job_id, request.epoch, request.step, request.state)
        )
        if w is None:
            return coordinator_pb2.HeartbeatReply(known=False)
        return coordinator_pb2.HeartbeatReply(known=True, stop_jobs=self.manager.on_heartbeat(w))

    async def Leave(
        self, request: coordinator_pb2.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.Empty:
        await self._guard(context)
        w = self.registry.get(request.worker_id)
        if w is None:
            await _abort(
                context, grpc.StatusCode.NOT_FOUND, f"no worker {request.worker_id[:64]!r}"
            )
        await self.manager.on_leave(w)
        return coordinator_pb2.Empty()

    async def ReportProgress(
        self, request: coordinator_pb2.ProgressReport, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.Empty:
        await self._guard(context)
        try:
            await self.manager.on_progress(progress_from_pb(request))
        except StaleReport as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OpDagError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return coordinator_pb2.Empty()

    async def UploadCheckpoint(
        self,
        request_iterator: AsyncIterator[coordinator_pb2.CheckpointPart],
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.Empty:
        await self._guard(context)
        try:
            first = await anext(request_iterator)
        except StopAsyncIteration:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
        if first.WhichOneof("part") != "header":
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "the stream must start with its header"
            )
        h = first.header
        try:
            job = self.manager.current_job(h.job_id, h.epoch)
            model = await self.manager.model_of(job)
            # Parameters, buffers and at most two optimizer tensors per parameter.
            limit = 3 * sum(p.nbytes for p in model.graph.params) + (1 << 20)
            assembler = TensorAssembler(h.tensors, max_bytes=limit)
            async for part in request_iterator:
                if part.WhichOneof("part") != "chunk":
                    await _abort(
                        context,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "only chunks may follow the header",
                    )
                assembler.feed(part.chunk)
            tensors = dict(assembler.finish())
            await self.manager.on_checkpoint(
                job_id=h.job_id,
                epoch=h.epoch,
                stage=h.stage,
                num_stages=h.num_stages,
                step=h.step,
                tensors=tensors,
            )
        except StaleReport as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OpDagError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return coordinator_pb2.Empty()

    # -- users -----------------------------------------------------------------------------

    async def SubmitJob(
        self, request: coordinator_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.JobInfo:
        await self._guard(context)
        if len(request.spec_yaml.encode()) > MAX_SPEC_BYTES:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the job spec exceeds {MAX_SPEC_BYTES} bytes",
            )
        try:
            job = await self.manager.submit(request.spec_yaml)
        except OpDagError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"job refused: {e}")
        return job_info_pb(job)

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        try:
            return self.manager.get(job_id)
        except JobError as e:
            await _abort(context, grpc.StatusCode.NOT_FOUND, str(e))

    async def GetJob(
        self, request: coordinator_pb2.JobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.JobInfo:
        await self._guard(context)
        job = await self._job(request.job_id, context)
        metrics = (
            await self.manager.metrics(job.job_id)
            if request.with_metrics
            else []
        )
        return job_info_pb(job, metrics)

    async def ListJobs(
        self, request: coordinator_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.JobList:
        await self._guard(context)
        jobs = sorted(self.manager.jobs.values(), key=lambda j: j.created_at)
        return coordinator_pb2.JobList(jobs=[job_info_pb(j) for j in jobs])

    async def CancelJob(
        self, request: coordinator_pb2.JobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.JobInfo:
        await self._guard(context)
        job = await self._job(request.job_id, context)
        return job_info_pb(await self.manager.cancel(job.job_id))

    async def WatchJob(
        self, request: coordinator_pb2.JobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[coordinator_pb2.JobInfo]:
        await self._guard(context)
        job = await self._job(request.job_id, context)
        async for snapshot in self.manager.watch(job.job_id):
            yield job_info_pb(snapshot)

    async def ListWorkers(
        self, request: coordinator_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.WorkerList:
        await self._guard(context)
        workers = sorted(self.registry.workers.values(), key=lambda w: w.registered_at)
        return coordinator_pb2.WorkerList(workers=[worker_info_pb(w) for w in workers])

    async def ListLinks(
        self, request: coordinator_pb2.ListLinksRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.LinkList:
        await self._guard(context)
        rows = self.manager.links.rows() if self.manager.links is not None else []
        return link_list_pb(rows, self.registry)

    async def GetPlan(
        self, request: coordinator_pb2.JobRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.PlanInfo:
        await self._guard(context)
        job = await self._job(request.job_id, context)
        if job.plan is None:
            await _abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} has no plan yet"
            )
        report = await self.manager.plan_report(job)
        return plan_info_pb(job, report)
