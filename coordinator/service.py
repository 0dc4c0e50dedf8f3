"""The coordinator's gRPC servicer: check the caller, decode, call the job manager, encode.

Each method decodes its request through `coordinator.serde`, calls the job manager, the
registry or a plain handler (`coordinator.worker_admission` for registrations,
`coordinator.checkpoint_upload` for checkpoints) and encodes the answer; the only logic
here is which refusal becomes which status. Every call first proves its caller's role
(`coordinator.roles`): the join token registers, a worker's credential heart-beats, leaves,
reports and uploads for itself and the stages its plan gave it, the operator token submits,
cancels and reads. A refusal is UNAUTHENTICATED (no credential, or a wrong one) or
PERMISSION_DENIED (a credential used outside its role), with a message naming what is
wrong; a malformed or inconsistent request gets an error status that names the problem.
Either way nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from coordinator import dataset_serde, history_serde, model_serde, serde
from coordinator.checkpoint_upload import receive_checkpoint
from coordinator.datasets import Datasets, check_reader
from coordinator.events import CLUSTER
from coordinator.job_record import Job, JobError, StaleReport
from coordinator.jobs import JobManager
from coordinator.model_export import export_tensors
from coordinator.planning.spec_limits import FLAGS as SPEC_FLAGS
from coordinator.registry import Registry
from coordinator.roles import Caller, Gatekeeper, Role, Unauthenticated, check_assigned
from coordinator.worker_admission import WorkerAdmission
from opdag.errors import OpDagError
from proto.certificates import CertificateAuthority
from proto.errors import WireError
from proto.rpc import Network, abort, require_token

log = logging.getLogger("archipelago.coordinator")

# Events one ListEvents answer holds at most (a client pages on with after_seq).
MAX_EVENTS_PER_CALL = 500
# Step records per page of a JobRecords stream (each page stays far below a message's limit).
RECORDS_PER_PAGE = 2000

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


class CoordinatorService(serde.CoordinatorServicerBase):
    """gRPC face of the job manager and the worker registry."""

    def __init__(
        self,
        manager: JobManager,
        registry: Registry,
        *,
        gate: Gatekeeper,
        heartbeat_s: float,
        worker_networks: tuple[Network, ...] = (),
        authority: CertificateAuthority | None = None,
        loopback_workers: bool = True,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.gate = gate
        self.heartbeat_s = heartbeat_s
        # With an authority (TLS), registration certifies each worker's server key.
        self.admission = WorkerAdmission(
            registry,
            manager,
            worker_networks,
            gate=gate,
            authority=authority,
            loopback=loopback_workers,
        )
        # Users' own datasets, within this coordinator's size bound (`coordinator.datasets`).
        self.datasets = Datasets(manager.store, manager.limits.max_dataset_bytes)

    async def _guard(self, context: grpc.aio.ServicerContext, rpc: str, *roles: Role) -> Caller:
        """The caller, if it holds one of `roles`; else the call ends refused."""
        try:
            return self.gate.require(context.invocation_metadata(), rpc, *roles)
        except Unauthenticated as e:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"{rpc}: {e}")
        except PermissionError as e:
            await abort(context, DENIED, str(e))

    async def _operator(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        await self._guard(context, rpc, Role.OPERATOR)

    async def _worker(self, context: grpc.aio.ServicerContext, rpc: str, named: str) -> str:
        """The calling worker's id, if it is `named` (the id the request is about)."""
        caller = await self._guard(context, rpc, Role.WORKER)
        if named != caller.worker_id:
            await abort(
                context,
                DENIED,
                f"{rpc} for worker {named[:64]!r} refused: the caller is worker {caller.worker_id}",
            )
        return caller.worker_id

    # -- workers ---------------------------------------------------------------------------

    async def Register(
        self, request: serde.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> serde.RegisterReply:
        await require_token(context, self.gate.token)
        try:
            # A worker coming back under its id proves it with its credential.
            claimed = self.gate.worker(context.invocation_metadata())
        except Unauthenticated as e:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"Register: {e}")
        try:
            w, keys = await self.admission.admit(
                serde.registration_from_pb(request), claimed=claimed
            )
        except ValueError as e:
            await abort(context, INVALID, str(e))
        except PermissionError as e:
            await abort(context, DENIED, str(e))
        return serde.register_reply_pb(w, self.heartbeat_s, keys)

    async def Heartbeat(
        self, request: serde.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> serde.HeartbeatReply:
        beat = serde.heartbeat_from_pb(request)
        await self._worker(context, "Heartbeat", beat.worker_id)
        w = self.registry.heartbeat(beat.worker_id, beat.reported)
        return serde.heartbeat_reply_pb(None if w is None else self.manager.on_heartbeat(w))

    async def Leave(
        self, request: serde.LeaveRequest, context: grpc.aio.ServicerContext
    ) -> serde.Empty:
        worker_id = serde.leaving_worker_id(request)
        await self._worker(context, "Leave", worker_id)
        w = self.registry.get(worker_id)
        if w is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, f"no worker {worker_id[:64]!r}")
        await self.manager.on_leave(w)
        return serde.empty_pb()

    async def ReportProgress(
        self, request: serde.ProgressReport, context: grpc.aio.ServicerContext
    ) -> serde.Empty:
        caller = await self._guard(context, "ReportProgress", Role.WORKER)
        try:
            progress = serde.progress_from_pb(request)
            check_assigned(
                self.manager.jobs.get(progress.job_id),
                caller=caller.worker_id,
                named=progress.worker_id,
                what="progress report",
                job_id=progress.job_id,
                epoch=progress.epoch,
                stage=progress.stage,
                replica=progress.replica,
            )
            await self.manager.on_progress(progress)
        except PermissionError as e:
            await abort(context, DENIED, str(e))
        except StaleReport as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        return serde.empty_pb()

    async def UploadCheckpoint(
        self,
        request_iterator: AsyncIterator[serde.CheckpointPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.Empty:
        caller = await self._guard(context, "UploadCheckpoint", Role.WORKER)
        try:
            upload, incoming = await serde.open_checkpoint(request_iterator)
            # Checked before a byte of its tensors is read.
            check_assigned(
                self.manager.jobs.get(upload.job_id),
                caller=caller.worker_id,
                named=upload.worker_id,
                what="checkpoint",
                job_id=upload.job_id,
                epoch=upload.epoch,
                stage=upload.stage,
                replica=None,
            )
            await receive_checkpoint(self.manager, upload, incoming)
        except PermissionError as e:
            await abort(context, DENIED, str(e))
        except StaleReport as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (OpDagError, WireError) as e:
            await abort(context, INVALID, str(e))
        return serde.empty_pb()

    # -- users -----------------------------------------------------------------------------

    async def SubmitJob(
        self, request: serde.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> serde.JobInfo:
        await self._operator(context, "SubmitJob")
        spec_yaml = serde.spec_yaml_from_pb(request)
        # The parser checks this bound as well; refusing a huge spec here keeps it off the
        # thread pool.
        max_bytes = self.manager.limits.spec.max_bytes
        if len(spec_yaml.encode()) > max_bytes:
            await abort(
                context,
                INVALID,
                f"job refused: the job spec exceeds {max_bytes} bytes ({SPEC_FLAGS['max_bytes']})",
            )
        try:
            job = await self.manager.submit(spec_yaml)
        except OpDagError as e:
            await abort(context, INVALID, f"job refused: {e}")
        return serde.job_info_pb(job)

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> Job:
        try:
            return self.manager.get(job_id)
        except JobError as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))

    async def GetJob(
        self, request: serde.JobRequest, context: grpc.aio.ServicerContext
    ) -> serde.JobInfo:
        await self._operator(context, "GetJob")
        query = serde.job_query_from_pb(request)
        job = await self._job(query.job_id, context)
        metrics = await self.manager.metrics(job.job_id) if query.with_metrics else []
        return serde.job_info_pb(job, metrics)

    async def ListJobs(
        self, request: serde.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> serde.JobList:
        await self._operator(context, "ListJobs")
        return serde.job_list_pb(sorted(self.manager.jobs.values(), key=lambda j: j.created_at))

    async def CancelJob(
        self, request: serde.JobRequest, context: grpc.aio.ServicerContext
    ) -> serde.JobInfo:
        await self._operator(context, "CancelJob")
        job = await self._job(serde.job_query_from_pb(request).job_id, context)
        return serde.job_info_pb(await self.manager.cancel(job.job_id))

    async def WatchJob(
        self, request: serde.JobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[serde.JobInfo]:
        await self._operator(context, "WatchJob")
        job = await self._job(serde.job_query_from_pb(request).job_id, context)
        async for snapshot in self.manager.watch(job.job_id):
            # The replicas' figures travel with each change; the per-step losses do not.
            recent = await self.manager.recent_metrics(snapshot)
            yield serde.job_info_pb(snapshot, recent=recent)

    async def ListWorkers(
        self, request: serde.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> serde.WorkerList:
        await self._operator(context, "ListWorkers")
        workers = sorted(self.registry.workers.values(), key=lambda w: w.registered_at)
        return serde.worker_list_pb(workers, self.registry)

    async def ListLinks(
        self, request: serde.ListLinksRequest, context: grpc.aio.ServicerContext
    ) -> serde.LinkList:
        await self._operator(context, "ListLinks")
        rows = self.manager.links.rows() if self.manager.links is not None else []
        return serde.link_list_pb(rows, self.registry)

    async def GetPlan(
        self, request: serde.JobRequest, context: grpc.aio.ServicerContext
    ) -> serde.PlanInfo:
        await self._operator(context, "GetPlan")
        job = await self._job(serde.job_query_from_pb(request).job_id, context)
        if job.plan is None:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} has no plan yet"
            )
        return serde.plan_info_pb(job, await self.manager.plan_report(job))

    async def ListEvents(
        self, request: history_serde.EventsRequest, context: grpc.aio.ServicerContext
    ) -> history_serde.EventList:
        await self._operator(context, "ListEvents")
        query = history_serde.events_query_from_pb(request, max_limit=MAX_EVENTS_PER_CALL)
        scope = CLUSTER
        if query.job_id:
            scope = (await self._job(query.job_id, context)).job_id
        events = await self.manager.events.since(scope, query.after_seq, query.limit)
        return history_serde.event_list_pb(events)

    async def JobRecords(
        self, request: history_serde.RecordsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[history_serde.RecordPage]:
        await self._operator(context, "JobRecords")
        job_id, since_step = history_serde.records_query_from_pb(request)
        job = await self._job(job_id, context)
        records = await self.manager.metrics(job.job_id, since_step)
        for page in history_serde.record_pages(records, RECORDS_PER_PAGE):
            yield page

    # -- users' own models: a job with its captured model, and the trained model back --------

    async def SubmitModelJob(
        self,
        request_iterator: AsyncIterator[model_serde.ModelJobPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.JobInfo:
        await self._operator(context, "SubmitModelJob")
        try:
            upload, chunks = await model_serde.open_model_job(
                request_iterator, max_spec_bytes=self.manager.limits.spec.max_bytes
            )
            job = await self.manager.submit_uploaded(upload, chunks)
        except (OpDagError, WireError) as e:
            await abort(context, INVALID, f"job refused: {e}")
        return serde.job_info_pb(job)

    async def ExportModel(
        self, request: model_serde.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[model_serde.ExportPart]:
        await self._operator(context, "ExportModel")
        job = await self._job(model_serde.export_job_id(request), context)
        try:
            step, tensors = await export_tensors(self.manager, job)
        except JobError as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        for part in model_serde.export_parts(job.job_id, step, tensors):
            yield part

    async def DescribeDataset(
        self, request: model_serde.DescribeDatasetRequest, context: grpc.aio.ServicerContext
    ) -> dataset_serde.DatasetManifest:
        await self._operator(context, "DescribeDataset")
        try:
            manifest = await self.manager.datasets.resolve(model_serde.dataset_name(request))
        except OpDagError as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        return dataset_serde.manifest_pb(manifest)

    # -- users' own data: `archipelago data put`, and stage-0 workers reading it -------------

    async def MissingDatasetChunks(
        self, request: dataset_serde.DatasetChunksQuery, context: grpc.aio.ServicerContext
    ) -> dataset_serde.DatasetChunksMissing:
        await self._operator(context, "MissingDatasetChunks")
        try:
            size, shas = dataset_serde.chunks_query_from_pb(request)
            missing = await self.datasets.missing(size, shas)
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        return dataset_serde.chunks_missing_pb(missing)

    async def PutDatasetChunk(
        self, request: dataset_serde.DatasetChunk, context: grpc.aio.ServicerContext
    ) -> serde.Empty:
        await self._operator(context, "PutDatasetChunk")
        try:
            await self.datasets.put_chunk(*dataset_serde.chunk_from_pb(request))
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        return serde.empty_pb()

    async def PutDataset(
        self, request: dataset_serde.DatasetManifest, context: grpc.aio.ServicerContext
    ) -> dataset_serde.DatasetInfo:
        await self._operator(context, "PutDataset")
        try:
            manifest = await self.datasets.put_manifest(
                dataset_serde.manifest_json_from_pb(request)
            )
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        return dataset_serde.dataset_info_pb(manifest)

    async def _dataset_reader(
        self, context: grpc.aio.ServicerContext, caller: Caller, sha: str
    ) -> None:
        """Only a worker running stage 0 of a job that reads the dataset may read it (its
        role is proved before its request is decoded)."""
        try:
            check_reader(self.manager.jobs.values(), caller.worker_id, sha)
        except PermissionError as e:
            await abort(context, DENIED, str(e))

    async def GetDatasetManifest(
        self, request: dataset_serde.DatasetRequest, context: grpc.aio.ServicerContext
    ) -> dataset_serde.DatasetManifest:
        caller = await self._guard(context, "GetDatasetManifest", Role.WORKER)
        try:
            sha = dataset_serde.dataset_request_from_pb(request)
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        await self._dataset_reader(context, caller, sha)
        try:
            manifest = await self.datasets.manifest(sha)
        except OpDagError as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        return dataset_serde.manifest_pb(manifest)

    async def GetDatasetChunk(
        self, request: dataset_serde.DatasetChunkRequest, context: grpc.aio.ServicerContext
    ) -> dataset_serde.DatasetChunk:
        caller = await self._guard(context, "GetDatasetChunk", Role.WORKER)
        try:
            sha, index = dataset_serde.chunk_request_from_pb(request)
        except OpDagError as e:
            await abort(context, INVALID, str(e))
        await self._dataset_reader(context, caller, sha)
        try:
            chunk_sha, data = await self.datasets.chunk(sha, index)
        except OpDagError as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        return dataset_serde.chunk_pb(chunk_sha, data)
