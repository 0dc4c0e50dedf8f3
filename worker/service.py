"""The worker's gRPC servicer: check the caller, decode, call the node, encode.

Each method decodes its request through `worker.serde`, hands it to the node or to a plain
handler (`worker.inbound` for streams of tensors, `worker.link_requests` for link
measurements) and encodes the answer; the only logic here is which refusal becomes which
status. Who may call what (`worker.credentials`): the coordinator's calls (LoadStage,
StartJob, StopJob, Status, MeasureLinks, SpotEvidence) need the coordinator's credential
toward this worker; peer transfers need the join token and their stage pair's (or sync group's)
secret; a Probe, the join token and the coordinator's ticket for the prober. A refusal is
UNAUTHENTICATED (no credential, or a wrong one) or PERMISSION_DENIED (a credential used
outside its role). Anything malformed gets an error status naming the problem and changes
nothing; the worker keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from opdag.errors import OpDagError
from proto.errors import StreamError, WireError
from proto.rpc import MAX_MESSAGE_BYTES, Network, abort, require_token
from worker import serde
from worker.credentials import Unauthenticated
from worker.inbound import receive_gradient_share, receive_stage, receive_transfer
from worker.link_requests import check_link_request, measure_links
from worker.node import JobStateError, WorkerNode
from worker.spot_evidence import EvidenceGone
from worker.stage_job import StageJob
from worker.transfer_kind import TransferKind

log = logging.getLogger("archipelago.worker")

# Probes echo at most this much (a probe is one message).
MAX_PROBE_BYTES = MAX_MESSAGE_BYTES - (64 << 10)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


class WorkerService(serde.WorkerServicerBase):
    """gRPC face of a `WorkerNode`."""

    def __init__(
        self,
        node: WorkerNode,
        *,
        worker_id: Callable[[], str | None],
        name: str,
        probe_networks: tuple[Network, ...] = (),
        probe_loopback: bool = True,
    ) -> None:
        self.node = node
        self.probe_networks = probe_networks
        # Whether link targets may be on this machine's loopback (this worker serves it).
        self.probe_loopback = probe_loopback
        self._worker_id = worker_id  # a callable: the id arrives after registration
        self.name = name

    async def _guard(self, context: grpc.aio.ServicerContext) -> None:
        """A peer's call: it must carry the join token (its own secret is checked after)."""
        await require_token(context, self.node.token)

    async def _coordinator(self, context: grpc.aio.ServicerContext, rpc: str) -> None:
        """Refuse `rpc` unless the coordinator made it."""
        try:
            self.node.credentials.check_coordinator(
                context.invocation_metadata(), rpc, self.node.token
            )
        except Unauthenticated as e:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PermissionError as e:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))

    async def LoadStage(
        self,
        request_iterator: AsyncIterator[serde.LoadStagePart],
        context: grpc.aio.ServicerContext,
    ) -> serde.LoadStageReply:
        await self._coordinator(context, "LoadStage")
        try:
            plan, incoming = await serde.open_stage(request_iterator)
            await receive_stage(self.node, plan, incoming)
        except StreamError as e:
            await abort(context, INVALID, str(e))
        except (OpDagError, WireError, ValueError) as e:
            await abort(context, INVALID, f"stage refused: {e}")
        return serde.load_stage_reply_pb(plan)

    async def StartJob(
        self, request: serde.JobControlRequest, context: grpc.aio.ServicerContext
    ) -> serde.Ack:
        await self._coordinator(context, "StartJob")
        control = serde.job_control_from_pb(request)
        try:
            await self.node.start(control.job_id, control.epoch)
        except JobStateError as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return serde.ack_pb("started")

    async def StopJob(
        self, request: serde.JobControlRequest, context: grpc.aio.ServicerContext
    ) -> serde.Ack:
        await self._coordinator(context, "StopJob")
        c = serde.job_control_from_pb(request)
        try:
            await self.node.stop(
                c.job_id, c.epoch, drain=c.drain, steps_done=c.steps_done, alone=c.alone
            )
        except JobStateError as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return serde.ack_pb("draining" if c.drain else "alone" if c.alone else "stopped")

    async def Activations(
        self,
        request_iterator: AsyncIterator[serde.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.Ack:
        return await self._transfer(TransferKind.FORWARD, request_iterator, context)

    async def Gradients(
        self,
        request_iterator: AsyncIterator[serde.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.Ack:
        return await self._transfer(TransferKind.BACKWARD, request_iterator, context)

    async def _transfer(
        self,
        kind: TransferKind,
        parts: AsyncIterator[serde.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.Ack:
        await self._guard(context)
        try:
            t, incoming = await serde.open_transfer(parts)
        except StreamError as e:
            await abort(context, INVALID, str(e))
        job = await self._job_for(
            lambda: self.node.job_for_transfer(t.job_id, t.epoch, t.src_stage, t.pair_secret),
            context,
        )
        try:
            await receive_transfer(self.node, job, kind, t, incoming)
        except (OpDagError, WireError) as e:
            await abort(context, INVALID, str(e))
        return serde.ack_pb()

    async def ReplicaGradients(
        self,
        request_iterator: AsyncIterator[serde.ReplicaGradientsPart],
        context: grpc.aio.ServicerContext,
    ) -> serde.Ack:
        await self._guard(context)
        try:
            share, incoming = await serde.open_gradient_share(request_iterator)
        except StreamError as e:
            await abort(context, INVALID, str(e))
        job = await self._job_for(
            lambda: self.node.job_for_share(share.job_id, share.epoch, share.sync_secret),
            context,
        )
        try:
            await receive_gradient_share(job, share, incoming)
        except (OpDagError, WireError) as e:
            await abort(context, INVALID, str(e))
        return serde.ack_pb()

    async def _job_for(
        self, find: Callable[[], StageJob], context: grpc.aio.ServicerContext
    ) -> StageJob:
        """The held job a peer's call is for (`find` checks its secret)."""
        try:
            return find()
        except PermissionError as e:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        except JobStateError as e:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def Status(
        self, request: serde.StatusRequest, context: grpc.aio.ServicerContext
    ) -> serde.WorkerStatus:
        await self._coordinator(context, "Status")
        return serde.worker_status_pb(self._worker_id() or "", self.name, self.node.status())

    async def Probe(
        self, request: serde.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> serde.ProbeReply:
        try:
            self.node.credentials.check_probe(context.invocation_metadata(), self.node.token)
        except Unauthenticated as e:
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(e))
        except PermissionError as e:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        nbytes = serde.probe_reply_bytes(request)
        if nbytes > MAX_PROBE_BYTES:
            await abort(
                context, INVALID, f"a probe may ask for at most {MAX_PROBE_BYTES} bytes back"
            )
        return serde.probe_reply_pb(nbytes)

    async def MeasureLinks(
        self, request: serde.MeasureLinksRequest, context: grpc.aio.ServicerContext
    ) -> serde.MeasureLinksReply:
        await self._coordinator(context, "MeasureLinks")
        links = serde.link_request_from_pb(request)
        try:
            check_link_request(links, self.probe_networks, loopback=self.probe_loopback)
        except ValueError as e:
            await abort(context, INVALID, str(e))
        except PermissionError as e:
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        figures = await measure_links(
            links,
            token=self.node.token,
            tls=self.node.tls,
            prober_id=self.node.credentials.worker_id,
        )
        return serde.link_figures_pb(figures)

    async def SpotEvidence(
        self, request: serde.SpotRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[serde.SpotEvidencePart]:
        """The coordinator's spot check: this stage's inputs of one recent micro-batch, the
        gradients it received for it, or its parameters at that step
        (`worker.spot_evidence`)."""
        await self._coordinator(context, "SpotEvidence")
        ask = serde.spot_request_from_pb(request)
        job = self.node.job
        if job is None or job.plan.job_id != ask.job_id or job.plan.epoch != ask.epoch:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no stage of job {ask.job_id} epoch {ask.epoch} here",
            )
        evidence = job.evidence
        if evidence is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, "spot checks are off here")
        try:
            if ask.params:
                parts = serde.spot_evidence_parts(job.plan, ask, params=evidence.params(ask.step))
            else:
                kept = evidence.gradients if ask.gradients else evidence.inputs
                inputs = kept(ask.step, ask.micro_batch)
                parts = serde.spot_evidence_parts(job.plan, ask, inputs=inputs)
        except EvidenceGone as e:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(e))
        async for part in parts:
            yield part
