"""The worker's serialisation boundary: protobuf messages to the worker's own dataclasses.

With `worker.coordinator_serde` (the messages to and from the coordinator), the only
worker module that touches generated classes: the servicer (`worker.service`) decodes and
encodes through it, and peer sends and link probes build and read their messages here.

Everything a worker receives is checked here before anything else sees it: the stage graph
passes the allow-list (via `opdag.graph_serde`), routes name values that exist, stage numbers are
in range, and data and optimizer settings pass their own validation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from opdag import graph_serde
from opdag.data import DataConfig
from opdag.errors import CodecError, OpDagError
from opdag.optim import OptimizerConfig
from proto import tensor_pb2, worker_pb2, worker_pb2_grpc
from proto.certificates import CertificateError, worker_name
from proto.rpc import MAX_DETAILS_CHARS, MIN_SECRET_CHARS
from proto.streams import IncomingTensors, open_stream, stream_parts
from proto.tensor_stream import Wire, encode_values, header_of
from worker.edge_compression import EdgeCodec
from worker.link_measurement import LinkFigure, LinkRequest, LinkTarget
from worker.spot_evidence import MAX_SPOT_KEEP
from worker.stage_plan import StagePlan, SyncLayer
from worker.value_guard import ValueBounds

if TYPE_CHECKING:
    from worker.node import NodeStatus


def _fail(what: str) -> CodecError:
    return CodecError(f"stage assignment: {what}")


def _peer_id(worker_id: str) -> str:
    """A peer's worker id as the plan names it ("" where it names none: such a peer can be
    reached over plain text only)."""
    if worker_id:
        try:
            worker_name(worker_id)
        except CertificateError as e:
            raise _fail(f"a peer's {e}") from None
    return worker_id


def stage_plan_from_pb(a: worker_pb2.StageAssignment) -> StagePlan:
    """Decode and check a stage assignment (the graph is fully validated)."""
    if not a.job_id or len(a.job_id) > 100:
        raise _fail("missing or overlong job id")
    if a.num_stages < 1 or a.num_stages > 4096 or a.stage >= a.num_stages:
        raise _fail(f"stage {a.stage} of {a.num_stages} is out of range")
    graph = graph_serde.graph_from_pb(a.graph)
    peers = {p.stage: p.address for p in a.peers}
    if any(s >= a.num_stages for s in peers):
        raise _fail("a peer's stage is out of range")
    peer_ids = {p.stage: _peer_id(p.worker_id) for p in a.peers}

    def routes(items: object, what: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for r in items:  # type: ignore[attr-defined]
            stages = tuple(int(s) for s in r.stages)
            if not stages or any(s >= a.num_stages or s == a.stage for s in stages):
                raise _fail(f"{what} route of {r.name!r} names stages {list(stages)}")
            if any(s not in peers for s in stages):
                raise _fail(f"{what} route of {r.name!r} names a stage with no peer address")
            if r.name in out:
                raise _fail(f"{what} route of {r.name!r} given twice")
            out[r.name] = stages
        return out

    sends = routes(a.sends, "send")
    receives_multi = routes(a.receives, "receive")
    data_routes = routes(a.data_routes, "data")
    for name in sends:
        if name not in graph.outputs:
            raise _fail(f"sends {name!r}, which the stage graph does not output")
    receives: dict[str, int] = {}
    for name, stages in receives_multi.items():
        if len(stages) != 1:
            raise _fail(f"{name!r} would come from several stages")
        if name not in graph.inputs:
            raise _fail(f"receives {name!r}, which the stage graph does not take")
        receives[name] = stages[0]
    if data_routes and a.stage != 0:
        raise _fail("only stage 0 loads and routes data")
    try:
        data = DataConfig(
            corpus=a.data.corpus,
            batch_size=a.data.batch_size,
            micro_batches=a.data.micro_batches,
            seed=a.data.seed,
            max_bytes=a.data.max_bytes,
            dataset=a.data.dataset,  # users' own data
        )
        optimizer = OptimizerConfig(
            name=a.optimizer.name,
            lr=a.optimizer.lr,
            weight_decay=a.optimizer.weight_decay,
            betas=(a.optimizer.beta1, a.optimizer.beta2),
            momentum=a.optimizer.momentum,
        )
    except OpDagError as e:
        raise _fail(str(e)) from None
    if a.start_step > a.total_steps or a.checkpoint_every < 1:
        raise _fail(
            f"steps {a.start_step}..{a.total_steps} every {a.checkpoint_every} make no sense"
        )
    pair_secrets = {ps.stage: ps.secret for ps in a.pair_secrets}
    if set(pair_secrets) != set(peers) or len(a.pair_secrets) != len(peers):
        raise _fail("the stage-pair secrets must be one for each peer stage")
    if any(len(v) < MIN_SECRET_CHARS for v in pair_secrets.values()):
        raise _fail("a stage-pair secret is too short")
    codecs: dict[int, EdgeCodec] = {}
    targets = {s for stages in sends.values() for s in stages}
    for c in a.codecs:
        if c.dst_stage not in targets or c.dst_stage in codecs:
            raise _fail(f"a codec for stage {c.dst_stage}, which this stage does not send to once")
        codecs[c.dst_stage] = EdgeCodec(c.dst_stage, c.codec, c.ratio, c.values)
        try:
            codecs[c.dst_stage].build()
        except CodecError as e:
            raise _fail(str(e)) from None
    replicas = a.replicas or 1  # an assignment from before replicas: one pipeline
    if replicas > 64 or a.replica >= replicas or data.micro_batches % replicas:
        raise _fail(
            f"replica {a.replica} of {replicas} (with {data.micro_batches} micro-batches) "
            "is out of range"
        )
    sync_peers = {p.replica: p.address for p in a.sync_peers}
    sync_peer_ids = {p.replica: _peer_id(p.worker_id) for p in a.sync_peers}
    if set(sync_peers) != set(range(replicas)) - {a.replica} or len(a.sync_peers) != replicas - 1:
        raise _fail("the sync peers must be the other replicas, once each")
    if replicas > 1 and len(a.sync_secret) < MIN_SECRET_CHARS:
        raise _fail("the sync group's secret is missing or too short")
    try:
        # An assignment from before value bounds sends none: the worker's own defaults.
        default = ValueBounds()
        bounds = ValueBounds(
            factor=a.value_factor or default.factor,
            warmup=a.value_warmup or default.warmup,
            window=a.value_window or default.window,
            ceiling=a.value_ceiling or default.ceiling,
        )
    except ValueError as e:
        raise _fail(str(e)) from None
    if a.spot_keep > MAX_SPOT_KEEP:
        raise _fail(f"spot_keep {a.spot_keep} is above {MAX_SPOT_KEEP} steps")
    if a.warmup_extra >= max(a.data.micro_batches, 1):
        raise _fail(
            f"warmup_extra {a.warmup_extra} is not below the step's "
            f"{a.data.micro_batches} micro-batches"
        )
    plan = StagePlan(
        job_id=a.job_id,
        epoch=a.epoch,
        stage=a.stage,
        num_stages=a.num_stages,
        graph=graph,
        peers=peers,
        peer_ids=peer_ids,
        sends=sends,
        receives=receives,
        data_routes=data_routes,
        data=data,
        context=a.data.context or None,
        fingerprint=a.data.fingerprint,
        optimizer=optimizer,
        start_step=a.start_step,
        total_steps=a.total_steps,
        checkpoint_every=a.checkpoint_every,
        pair_secrets=pair_secrets,
        sync_secret=a.sync_secret,
        codecs=codecs,
        replica=a.replica,
        replicas=replicas,
        sync_peers=sync_peers,
        sync_peer_ids=sync_peer_ids,
        sync_kind=a.sync_kind or "sync",  # an assignment from before sync policies
        sync_period=a.sync_period or 1,
        sync_values=a.sync_values or "fp32",
        sync_aggregate=a.sync_aggregate or "mean",
        value_bounds=bounds,
        spot_keep=a.spot_keep,
        warmup_extra=a.warmup_extra,
        outer=(a.outer_name, a.outer_lr, a.outer_momentum) if a.outer_name else None,
        sync_layers=tuple(
            SyncLayer(la.name, tuple(la.params), tuple(la.iterations)) for la in a.sync_layers
        ),
    )
    if why := plan.sync_problem():
        raise _fail(why)
    return plan


@dataclass(frozen=True)
class Transfer:
    """The header of one peer-to-peer transfer (values for one micro-batch); the values
    themselves follow on the stream (`proto.streams.IncomingTensors`)."""

    job_id: str
    epoch: int
    pair_secret: str
    step: int
    micro_batch: int
    src_stage: int


@dataclass(frozen=True)
class GradientShare:
    """The header of one replica's gradients of a stage for one step, sent to the other
    replicas of the stage; the tensors follow on the stream."""

    job_id: str
    epoch: int
    sync_secret: str
    step: int
    stage: int
    src_replica: int


def transfer_from_pb(h: worker_pb2.TransferHeader) -> Transfer:
    return Transfer(
        job_id=h.job_id,
        epoch=h.epoch,
        pair_secret=h.pair_secret,
        step=h.step,
        micro_batch=h.micro_batch,
        src_stage=h.src_stage,
    )


def transfer_header_pb(
    *,
    job_id: str,
    epoch: int,
    pair_secret: str,
    step: int,
    micro_batch: int,
    src_stage: int,
    values: list[tensor_pb2.NamedValue],
    tensors: list[tensor_pb2.TensorHeader],
) -> worker_pb2.TransferHeader:
    return worker_pb2.TransferHeader(
        job_id=job_id,
        epoch=epoch,
        pair_secret=pair_secret,
        step=step,
        micro_batch=micro_batch,
        src_stage=src_stage,
        values=values,
        tensors=tensors,
    )


# -- the worker's servicer: the requests it decodes and the replies it encodes --------------

WorkerServicerBase = worker_pb2_grpc.WorkerServicer
LoadStagePart = worker_pb2.LoadStagePart
LoadStageReply = worker_pb2.LoadStageReply
JobControlRequest = worker_pb2.JobControl
TransferPart = worker_pb2.TransferPart
ReplicaGradientsPart = worker_pb2.ReplicaGradientsPart
Ack = worker_pb2.Ack
StatusRequest = worker_pb2.StatusRequest
WorkerStatus = worker_pb2.WorkerStatus
ProbeRequest = worker_pb2.ProbeRequest
ProbeReply = worker_pb2.ProbeReply
MeasureLinksRequest = worker_pb2.MeasureLinksRequest
MeasureLinksReply = worker_pb2.MeasureLinksReply
SpotRequest = worker_pb2.SpotRequest
SpotEvidencePart = worker_pb2.SpotEvidencePart


def add_worker_servicer(server: grpc.aio.Server, servicer: WorkerServicerBase) -> None:
    """Serve the worker API from `servicer` on `server`."""
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)


async def open_stage(parts: AsyncIterator[LoadStagePart]) -> tuple[StagePlan, IncomingTensors]:
    """A LoadStage stream's assignment, decoded and checked, and its tensors still to come
    (StreamError for a stream that does not start with it; CodecError for a bad one)."""
    assignment, incoming = await open_stream(parts, "assignment")
    return stage_plan_from_pb(assignment), incoming


async def open_gradient_share(
    parts: AsyncIterator[ReplicaGradientsPart],
) -> tuple[GradientShare, IncomingTensors]:
    """A ReplicaGradients stream's header, and its tensors still to come."""
    h, incoming = await open_stream(parts, "header")
    share = GradientShare(h.job_id, h.epoch, h.sync_secret, h.step, h.stage, h.src_replica)
    return share, incoming


async def open_transfer(parts: AsyncIterator[TransferPart]) -> tuple[Transfer, IncomingTensors]:
    """An Activations or Gradients stream's header, and its values still to come."""
    header, incoming = await open_stream(parts, "header")
    return transfer_from_pb(header), incoming


@dataclass(frozen=True)
class JobControl:
    """Start, stop or drain a job the worker holds."""

    job_id: str
    epoch: int
    drain: bool
    steps_done: int
    alone: bool = False


def job_control_from_pb(r: JobControlRequest) -> JobControl:
    return JobControl(r.job_id, r.epoch, r.drain, r.steps_done, r.alone)


def load_stage_reply_pb(plan: StagePlan) -> LoadStageReply:
    return LoadStageReply(job_id=plan.job_id, epoch=plan.epoch, stage=plan.stage)


def ack_pb(message: str = "") -> Ack:
    return Ack(message=message)


def worker_status_pb(worker_id: str, name: str, s: NodeStatus) -> WorkerStatus:
    return WorkerStatus(
        worker_id=worker_id,
        name=name,
        job_id=s.job_id,
        epoch=s.epoch,
        stage=s.stage,
        step=s.step,
        state=s.state,
    )


def probe_reply_bytes(r: ProbeRequest) -> int:
    """How many bytes a probe asks to have sent back."""
    return r.reply_bytes


def probe_reply_pb(nbytes: int) -> ProbeReply:
    return ProbeReply(payload=bytes(nbytes))


def link_request_from_pb(r: MeasureLinksRequest) -> LinkRequest:
    return LinkRequest(
        targets=tuple(LinkTarget(t.worker_id, t.address, t.ticket) for t in r.targets),
        max_bytes=r.max_bytes,
        target_seconds=r.target_seconds,
    )


def link_figures_pb(figures: Sequence[LinkFigure]) -> MeasureLinksReply:
    reply = MeasureLinksReply()
    for fig in figures:
        reply.links.add(
            worker_id=fig.worker_id,
            bandwidth=fig.bandwidth,
            rtt_s=fig.rtt_s,
            bytes=fig.nbytes,
            error=fig.error[:MAX_DETAILS_CHARS],
        )
    return reply


# -- what the worker sends: to the coordinator, to peer stages, to probed links ---------------

WorkerStub = worker_pb2_grpc.WorkerStub


def worker_stub(channel: grpc.aio.Channel) -> WorkerStub:
    """Another worker's API over `channel`."""
    return WorkerStub(channel)


def transfer_parts(
    *,
    plan: StagePlan,
    dst: int,
    step: int,
    micro_batch: int,
    values: Mapping[str, object],
) -> tuple[int, Callable[[], AsyncIterator[worker_pb2.TransferPart]]]:
    """The tensor bytes of one micro-batch's transfer from this stage to stage `dst`, and a
    function that makes its Activations or Gradients stream afresh, once for each try."""
    named, tensors = encode_values(values)
    header = transfer_header_pb(
        job_id=plan.job_id,
        epoch=plan.epoch,
        pair_secret=plan.pair_secrets.get(dst, ""),
        step=step,
        micro_batch=micro_batch,
        src_stage=plan.stage,
        values=named,
        tensors=[header_of(name, t) for name, t in tensors],
    )
    nbytes = sum(h.nbytes for h in header.tensors)

    def parts() -> AsyncIterator[worker_pb2.TransferPart]:
        return stream_parts(worker_pb2.TransferPart, "header", header, [t for _, t in tensors])

    return nbytes, parts


def gradient_share_parts(
    *, plan: StagePlan, step: int, tensors: Sequence[tuple[str, torch.Tensor]]
) -> tuple[int, Callable[[], AsyncIterator[worker_pb2.ReplicaGradientsPart]]]:
    """The tensor bytes of this replica's gradients of `step`, and a function that makes
    their ReplicaGradients stream afresh, once for each try."""
    header = worker_pb2.ReplicaGradientsHeader(
        job_id=plan.job_id,
        epoch=plan.epoch,
        sync_secret=plan.sync_secret,
        step=step,
        stage=plan.stage,
        src_replica=plan.replica,
        tensors=[header_of(name, t) for name, t in tensors],
    )
    nbytes = sum(h.nbytes for h in header.tensors)

    def parts() -> AsyncIterator[worker_pb2.ReplicaGradientsPart]:
        return stream_parts(
            worker_pb2.ReplicaGradientsPart, "header", header, [t for _, t in tensors]
        )

    return nbytes, parts


def probe_request_pb(payload_bytes: int) -> worker_pb2.ProbeRequest:
    """A link probe carrying `payload_bytes` zero bytes, asking for nothing back."""
    return worker_pb2.ProbeRequest(payload=bytes(payload_bytes), reply_bytes=0)


# -- spot checks: the evidence a stage hands the coordinator ----------------------------------


@dataclass(frozen=True)
class SpotAsk:
    """What the coordinator asks a stage for: one micro-batch's inputs, or the stage's
    parameters and buffers at one step."""

    job_id: str
    epoch: int
    step: int
    micro_batch: int
    params: bool
    gradients: bool = False  # (without params) the gradients it received instead


def spot_request_from_pb(r: SpotRequest) -> SpotAsk:
    return SpotAsk(r.job_id, r.epoch, r.step, r.micro_batch, r.params, r.gradients)


def spot_evidence_parts(
    plan: StagePlan,
    ask: SpotAsk,
    *,
    inputs: Mapping[str, object] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
) -> AsyncIterator[SpotEvidencePart]:
    """The SpotEvidence stream: a header with the inputs' structure (or the parameters'
    names), then the tensors' bytes."""
    named: list[tensor_pb2.NamedValue] = []
    tensors: list[tuple[str, Wire]] = []
    if inputs is not None:
        named, tensors = encode_values(inputs)
    elif params is not None:
        tensors = [(n, t.contiguous()) for n, t in params.items()]
    header = worker_pb2.SpotEvidenceHeader(
        job_id=plan.job_id,
        epoch=plan.epoch,
        stage=plan.stage,
        step=ask.step,
        micro_batch=ask.micro_batch,
        values=named,
        tensors=[header_of(n, t) for n, t in tensors],
    )
    return stream_parts(SpotEvidencePart, "header", header, [t for _, t in tensors])
