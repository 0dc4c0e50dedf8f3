"""The worker's gRPC servicer: check the caller, decode, call the node, encode.

Anything malformed gets an error status naming the problem and changes nothing; the
worker keeps serving. Declared tensor sizes are checked against what the stage graph says
the message may hold before any memory is set aside for them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc

from opdag.errors import OpDagError
from proto import worker_pb2, worker_pb2_grpc
from proto.rpc import (
    ADDRESS_PATTERN,
    MAX_DETAILS_CHARS,
    MAX_MESSAGE_BYTES,
    address_in_networks,
    require_token,
)
from proto.tensor_stream import TensorAssembler, decode_values
from worker.link_probe import check_request, measure_link
from worker.node import JobStateError, WorkerNode
from worker.serde import stage_plan_from_pb, transfer_from_pb

log = logging.getLogger("archipelago.worker")

# Probes echo at most this much (a probe is one message).
MAX_PROBE_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
# Links one MeasureLinks call may ask for (each is measured in turn).
MAX_LINK_TARGETS = 64


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str
) -> NoReturn:
    await context.abort(code, message[:MAX_DETAILS_CHARS])
    raise AssertionError("abort returns only by raising")


async def _first(parts: AsyncIterator[Any], field: str, context: grpc.aio.ServicerContext) -> Any:
    """The stream's first message, which must carry `field`."""
    try:
        first = await anext(parts)
    except StopAsyncIteration:
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "empty stream")
    if first.WhichOneof("part") != field:
        await _abort(
            context, grpc.StatusCode.INVALID_ARGUMENT, f"the stream must start with its {field}"
        )
    return getattr(first, field)


async def _read_chunks(
    parts: AsyncIterator[Any], assembler: TensorAssembler, context: grpc.aio.ServicerContext
) -> None:
    async for part in parts:
        if part.WhichOneof("part") != "chunk":
            await _abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header"
            )
        assembler.feed(part.chunk)


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """gRPC face of a `WorkerNode`."""

    def __init__(
        self,
        node: WorkerNode,
        *,
        worker_id: Any,
        name: str,
        probe_networks: tuple[Any, ...] = (),
    ) -> None:
        self.node = node
        self.probe_networks = probe_networks
        self._worker_id = worker_id  # a callable: the id arrives after registration
        self.name = name

    async def _guard(self, context: grpc.aio.ServicerContext) -> None:
        await require_token(context, self.node.token)

    async def LoadStage(
        self,
        request_iterator: AsyncIterator[worker_pb2.LoadStagePart],
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.LoadStageReply:
        await self._guard(context)
        try:
            assignment = await _first(request_iterator, "assignment", context)
            plan = stage_plan_from_pb(assignment)
            # Parameters, buffers and at most two optimizer tensors per parameter.
            limit = 3 * sum(p.nbytes for p in plan.graph.params) + (1 << 20)
            assembler = TensorAssembler(plan.tensors, max_bytes=limit)
            await _read_chunks(request_iterator, assembler, context)
            await self.node.load_stage(plan, dict(assembler.finish()))
        except (OpDagError, ValueError) as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"stage refused: {e}")
        return worker_pb2.LoadStageReply(job_id=plan.job_id, epoch=plan.epoch, stage=plan.stage)

    async def StartJob(
        self, request: worker_pb2.JobControl, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Ack:
        await self._guard(context)
        try:
            await self.node.start(request.job_id, request.epoch)
        except JobStateError as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return worker_pb2.Ack(message="started")

    async def StopJob(
        self, request: worker_pb2.JobControl, context: grpc.aio.ServicerContext
    ) -> worker_pb2.Ack:
        await self._guard(context)
        try:
            await self.node.stop(
                request.job_id, request.epoch, drain=request.drain, steps_done=request.steps_done
            )
        except JobStateError as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return worker_pb2.Ack(message="draining" if request.drain else "stopped")

    async def Activations(
        self,
        request_iterator: AsyncIterator[worker_pb2.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.Ack:
        return await self._transfer("F", request_iterator, context)

    async def Gradients(
        self,
        request_iterator: AsyncIterator[worker_pb2.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.Ack:
        return await self._transfer("B", request_iterator, context)

    async def _transfer(
        self,
        kind: str,
        parts: AsyncIterator[worker_pb2.TransferPart],
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.Ack:
        await self._guard(context)
        header = transfer_from_pb(await _first(parts, "header", context))
        try:
            job = self.node.job_for_transfer(header.job_id, header.epoch, header.job_secret)
        except PermissionError as e:
            await _abort(context, grpc.StatusCode.PERMISSION_DENIED, str(e))
        except JobStateError as e:
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        try:
            limit = job.expected_bytes(kind, header.src_stage)
            assembler = TensorAssembler(header.tensors, max_bytes=limit, compressed=True)
            await _read_chunks(parts, assembler, context)
            tensors = [t for _, t in assembler.finish_wire()]
            values = decode_values(header.values, tensors, device=self.node.device)
            await self.node.deliver(
                job, kind, header.step, header.micro_batch, header.src_stage, values
            )
        except OpDagError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return worker_pb2.Ack()

    async def Status(
        self, request: worker_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.WorkerStatus:
        await self._guard(context)
        s = self.node.status()
        return worker_pb2.WorkerStatus(
            worker_id=self._worker_id() or "",
            name=self.name,
            job_id=s.job_id,
            epoch=s.epoch,
            stage=s.stage,
            step=s.step,
            state=s.state,
        )

    async def Probe(
        self, request: worker_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ProbeReply:
        await self._guard(context)
        if request.reply_bytes > MAX_PROBE_BYTES:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a probe may ask for at most {MAX_PROBE_BYTES} bytes back",
            )
        return worker_pb2.ProbeReply(payload=bytes(request.reply_bytes))

    async def MeasureLinks(
        self, request: worker_pb2.MeasureLinksRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.MeasureLinksReply:
        await self._guard(context)
        try:
            check_request(request.max_bytes, request.target_seconds)
        except ValueError as e:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if len(request.targets) > MAX_LINK_TARGETS:
            await _abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_LINK_TARGETS} links may be measured in one call",
            )
        for t in request.targets:
            if not 0 < len(t.worker_id) <= 100 or not ADDRESS_PATTERN.match(t.address):
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"link target {t.worker_id[:40]!r} at {t.address[:80]!r} is not a worker "
                    "id and HOST:PORT",
                )
            if not address_in_networks(t.address, self.probe_networks):
                await _abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"link target {t.address[:80]!r} is outside the networks this worker "
                    "probes (--probe-networks)",
                )
        reply = worker_pb2.MeasureLinksReply()
        # One link at a time: concurrent probes from one host would share its uplink.
        for t in request.targets:
            fig = await measure_link(
                t.worker_id,
                t.address,
                token=self.node.token,
                tls=self.node.tls,
                max_bytes=request.max_bytes,
                target_seconds=request.target_seconds,
            )
            reply.links.add(
                worker_id=fig.worker_id,
                bandwidth=fig.bandwidth,
                rtt_s=fig.rtt_s,
                bytes=fig.nbytes,
                error=fig.error[:MAX_DETAILS_CHARS],
            )
        return reply
