"""A worker's link to the coordinator: join, heart-beat, report, upload checkpoints.

The coordinator may restart at any time. Registration is retried until it answers; a
heartbeat that finds the coordinator does not know this worker registers again (keeping
the worker's id); progress reports queue up and are delivered in order once it is back, so
a job's steps keep counting while the coordinator is away.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
import torch

from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.rpc import TlsConfig, open_channel, token_metadata
from proto.tensor_stream import header_of, iter_chunks
from worker.resources import Resources
from worker.serde import StagePlan
from worker.stage_job import StepReport

log = logging.getLogger("archipelago.worker")


class RefusedError(Exception):
    """The coordinator refused this worker (a wrong join token)."""


class CoordinatorLink:
    """Everything a worker says to the coordinator."""

    def __init__(
        self,
        address: str,
        *,
        token: str,
        tls: TlsConfig | None,
        name: str,
        resources: Resources,
        retry_s: float = 0.5,
    ) -> None:
        self.address = address
        self.token = token
        self.name = name
        self.resources = resources
        self.retry_s = retry_s
        self.advertise = ""
        self.worker_id = ""
        self.heartbeat_s = 1.0
        self._channel = open_channel(address, tls)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._metadata = token_metadata(token)
        self._reports: collections.deque[coordinator_pb2.ProgressReport] = collections.deque()
        self._report_ready = asyncio.Event()
        self._unreachable_logged = False
        # Set once this worker has asked to leave: a coordinator that then no longer
        # knows it has let it go, and must not get it back as a fresh volunteer.
        self.leaving = False

    # -- joining ---------------------------------------------------------------------------

    async def register(self) -> str:
        """Register (again), retrying until the coordinator answers; returns the worker id."""
        request = coordinator_pb2.RegisterRequest(
            name=self.name,
            address=self.advertise,
            worker_id=self.worker_id,
            resources=coordinator_pb2.WorkerResources(
                gflops=self.resources.gflops,
                memory_bytes=self.resources.memory_bytes,
                device=self.resources.device,
                threads=self.resources.threads,
            ),
        )
        while True:
            try:
                reply = await self._stub.Register(request, metadata=self._metadata, timeout=10)
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise RefusedError(
                        f"the coordinator refused this worker: {e.details()}"
                    ) from None
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RefusedError(
                        f"the coordinator refused to register: {e.details()}"
                    ) from None
                self._log_unreachable(e)
                await asyncio.sleep(self.retry_s)
                continue
            self._unreachable_logged = False
            self.worker_id = reply.worker_id
            self.heartbeat_s = reply.heartbeat_interval_s or 1.0
            log.info("registered with %s as %s (%s)", self.address, self.name, self.worker_id)
            return self.worker_id

    def _log_unreachable(self, e: grpc.aio.AioRpcError) -> None:
        if not self._unreachable_logged:
            log.warning("coordinator %s unreachable (%s); retrying", self.address, e.code().name)
            self._unreachable_logged = True

    async def heartbeat_loop(
        self, status: Callable[[], tuple[str, int, int, str]], stop_job: Callable[[str], object]
    ) -> None:
        """Heart-beat forever; re-register when forgotten; stop jobs the coordinator drops."""
        while True:
            job_id, epoch, step, state = status()
            try:
                reply = await self._stub.Heartbeat(
                    coordinator_pb2.HeartbeatRequest(
                        worker_id=self.worker_id, job_id=job_id, epoch=epoch, step=step, state=state
                    ),
                    metadata=self._metadata,
                    timeout=max(5.0, 3 * self.heartbeat_s),
                )
                self._unreachable_logged = False
                if not reply.known and not self.leaving:
                    await self.register()
                for dropped in reply.stop_jobs:
                    result = stop_job(dropped)
                    if asyncio.iscoroutine(result):
                        await result
            except grpc.aio.AioRpcError as e:
                self._log_unreachable(e)
            await asyncio.sleep(self.heartbeat_s)

    async def leave(self) -> None:
        self.leaving = True
        try:
            await self._stub.Leave(
                coordinator_pb2.LeaveRequest(worker_id=self.worker_id),
                metadata=self._metadata,
                timeout=10,
            )
        except grpc.aio.AioRpcError as e:
            log.warning("could not tell the coordinator this worker leaves: %s", e.code().name)

    # -- reports (the stage job's Reporter) ------------------------------------------------

    def progress(self, report: StepReport) -> None:
        pb = coordinator_pb2.ProgressReport(
            worker_id=self.worker_id,
            job_id=report.job_id,
            epoch=report.epoch,
            stage=report.stage,
            step=report.step,
            has_loss=report.loss is not None,
            loss=report.loss or 0.0,
            step_seconds=report.step_seconds,
            compute_seconds=report.compute_seconds,
            sent=[
                coordinator_pb2.LinkBytes(dst_stage=d, bytes=b)
                for d, b in sorted(report.sent.items())
            ],
            finished=report.finished,
            drained=report.drained,
            error=report.error,
        )
        self._reports.append(pb)
        self._report_ready.set()

    async def report_loop(self) -> None:
        """Deliver queued reports in order; keep each until the coordinator takes it."""
        while True:
            await self._report_ready.wait()
            while self._reports:
                report = self._reports[0]
                try:
                    await self._stub.ReportProgress(report, metadata=self._metadata, timeout=10)
                except grpc.aio.AioRpcError as e:
                    if e.code() in (
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.FAILED_PRECONDITION,
                    ):
                        # The coordinator has moved on from that job or epoch: drop it.
                        log.info("report for job %s dropped: %s", report.job_id, e.details())
                        self._reports.popleft()
                        continue
                    self._log_unreachable(e)
                    await asyncio.sleep(self.retry_s)
                    continue
                self._reports.popleft()
            self._report_ready.clear()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued report is delivered; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._reports:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def checkpoint(
        self, plan: StagePlan, steps_done: int, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Upload this stage's state after `steps_done` steps, retrying while unreachable."""
        items = list(tensors.items())
        header = coordinator_pb2.CheckpointHeader(
            worker_id=self.worker_id,
            job_id=plan.job_id,
            epoch=plan.epoch,
            stage=plan.stage,
            num_stages=plan.num_stages,
            step=steps_done,
            tensors=[header_of(name, t) for name, t in items],
        )

        async def parts() -> AsyncIterator[coordinator_pb2.CheckpointPart]:
            yield coordinator_pb2.CheckpointPart(header=header)
            for chunk in iter_chunks([t for _, t in items]):
                yield coordinator_pb2.CheckpointPart(chunk=chunk)

        while True:
            try:
                await self._stub.UploadCheckpoint(parts(), metadata=self._metadata)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.FAILED_PRECONDITION,
                ):
                    log.warning("checkpoint of step %d refused: %s", steps_done, e.details())
                    return
                self._log_unreachable(e)
                await asyncio.sleep(self.retry_s)

    async def close(self) -> None:
        await self._channel.close()
