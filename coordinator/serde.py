"""The coordinator's serialisation boundary: its dataclasses to protobuf messages and back.

The only coordinator module that touches generated classes. The servicer
(`coordinator.service`) annotates with the message names exported here and calls these to
decode its requests and encode its replies; the worker client (`coordinator.worker_client`)
builds what it sends a worker and reads the answers here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from coordinator.checkpoint_upload import CheckpointUpload
from coordinator.handover import StageHandover
from coordinator.job_record import Job, PlanReport, Progress, Suspect
from coordinator.registry import Registry, WorkerState
from coordinator.replica_metrics import ReplicaMetrics, summarise_replicas
from coordinator.roles import WorkerKeys
from coordinator.worker_admission import Registration
from opdag import graph_serde
from proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from proto.rpc import ticket
from proto.streams import IncomingTensors, open_stream, stream_parts
from proto.tensor_stream import header_of

# -- what the coordinator sends workers --------------------------------------------------------

WorkerStub = worker_pb2_grpc.WorkerStub
LoadStagePart = worker_pb2.LoadStagePart


def worker_stub(channel: grpc.aio.Channel) -> WorkerStub:
    """Calls of the worker API over `channel`."""
    return WorkerStub(channel)


def stage_pair_secret(
    plan_secret: str, job_id: str, epoch: int, replica: int, a: int, b: int
) -> str:
    """The secret stages `a` and `b` of one replica of a plan share, derived from the plan's
    own secret (which never leaves the coordinator): each worker is given only the secrets
    of the pairs it is in, so a transfer's secret proves the sender's stage."""
    return ticket(plan_secret, "pair", job_id, epoch, replica, min(a, b), max(a, b))


def stage_assignment_pb(h: StageHandover) -> worker_pb2.StageAssignment:
    """What a worker needs to build and run one stage."""
    spec, plan, stage, routes = h.spec, h.plan, h.stage, h.routes
    job_id, epoch, fingerprint, start_step, secret, tensors = (
        h.job_id,
        h.epoch,
        h.fingerprint,
        h.start_step,
        h.secret,
        h.tensors,
    )
    data = spec.data
    opt = spec.optimizer
    return worker_pb2.StageAssignment(
        job_id=job_id,
        epoch=epoch,
        stage=stage.index,
        num_stages=plan.num_stages,
        graph=graph_serde.graph_to_pb(stage.graph),
        # The other stages of this replica's pipeline, and this stage in the other replicas.
        peers=[
            worker_pb2.Peer(stage=p.stage, address=p.address, worker_id=p.worker_id)
            for p in plan.placements
            if p.stage != stage.index and p.replica == h.replica
        ],
        replica=h.replica,
        replicas=plan.replicas,
        sync_peers=[
            worker_pb2.ReplicaPeer(replica=p.replica, address=p.address, worker_id=p.worker_id)
            for p in plan.placements
            if p.stage == stage.index and p.replica != h.replica
        ],
        sync_kind=spec.sync.kind,
        sync_period=spec.sync.period,
        sync_values=spec.sync.values,
        sync_aggregate=spec.sync.aggregate,
        value_factor=spec.trust.values.factor,
        value_warmup=spec.trust.values.warmup,
        value_window=spec.trust.values.window,
        value_ceiling=spec.trust.values.ceiling,
        # Spot checks need a next stage to compare with: none in a plan of one stage.
        spot_keep=spec.trust.spot_checks.keep
        if spec.trust.spot_checks.on and plan.num_stages > 1
        else 0,
        warmup_extra=plan.warmup_extra,
        outer_name=spec.sync.outer.name if spec.sync.outer else "",
        outer_lr=spec.sync.outer.lr if spec.sync.outer else 0.0,
        outer_momentum=spec.sync.outer.momentum if spec.sync.outer else 0.0,
        sync_layers=[
            worker_pb2.SyncLayer(name=la.name, params=la.params, iterations=la.iterations)
            for la in h.sync_layers
        ],
        sends=[worker_pb2.Route(name=n, stages=s) for n, s in routes["sends"].items()],
        codecs=[
            worker_pb2.LinkCodec(
                dst_stage=c.dst_stage, codec=c.codec, ratio=c.ratio, values=c.values
            )
            for c in plan.codecs
            if c.src_stage == stage.index
        ],
        receives=[worker_pb2.Route(name=n, stages=s) for n, s in routes["receives"].items()],
        data_routes=[worker_pb2.Route(name=n, stages=s) for n, s in routes["data"].items()],
        data=worker_pb2.DataSpec(
            corpus=data.corpus,
            batch_size=data.batch_size,
            micro_batches=data.micro_batches,
            seed=data.seed,
            max_bytes=data.max_bytes,
            context=spec.context() or 0,
            fingerprint=fingerprint,
            dataset=data.dataset,  # users' own data
        ),
        optimizer=worker_pb2.OptimizerSpec(
            name=opt.name,
            lr=opt.lr,
            weight_decay=opt.weight_decay,
            beta1=opt.betas[0],
            beta2=opt.betas[1],
            momentum=opt.momentum,
        ),
        start_step=start_step,
        total_steps=spec.steps,
        checkpoint_every=spec.checkpoint.every,
        pair_secrets=[
            worker_pb2.PairSecret(
                stage=p.stage,
                secret=stage_pair_secret(secret, job_id, epoch, h.replica, stage.index, p.stage),
            )
            for p in plan.placements
            if p.stage != stage.index and p.replica == h.replica
        ],
        # The stage's sync group shares one: its members all average the same tensors.
        sync_secret=ticket(secret, "sync", job_id, epoch, stage.index) if plan.replicas > 1 else "",
        tensors=[header_of(name, t) for name, t in tensors],
    )


def load_stage_parts(h: StageHandover) -> AsyncIterator[LoadStagePart]:
    """The LoadStage stream: the assignment (built now, so a bad one fails before the call),
    then the stage's tensors in chunks."""
    assignment = stage_assignment_pb(h)
    return stream_parts(LoadStagePart, "assignment", assignment, [t for _, t in h.tensors])


def job_control_pb(
    job_id: str, epoch: int, *, drain: bool = False, steps_done: int = 0, alone: bool = False
) -> worker_pb2.JobControl:
    return worker_pb2.JobControl(
        job_id=job_id, epoch=epoch, drain=drain, steps_done=steps_done, alone=alone
    )


# -- the coordinator's servicer: the requests it decodes and the replies it encodes -----------

CoordinatorServicerBase = coordinator_pb2_grpc.CoordinatorServicer
RegisterRequest = coordinator_pb2.RegisterRequest
RegisterReply = coordinator_pb2.RegisterReply
HeartbeatRequest = coordinator_pb2.HeartbeatRequest
HeartbeatReply = coordinator_pb2.HeartbeatReply
LeaveRequest = coordinator_pb2.LeaveRequest
Empty = coordinator_pb2.Empty
ProgressReport = coordinator_pb2.ProgressReport
CheckpointPart = coordinator_pb2.CheckpointPart
SubmitJobRequest = coordinator_pb2.SubmitJobRequest
JobRequest = coordinator_pb2.JobRequest
JobInfo = coordinator_pb2.JobInfo
ListJobsRequest = coordinator_pb2.ListJobsRequest
JobList = coordinator_pb2.JobList
ListWorkersRequest = coordinator_pb2.ListWorkersRequest
WorkerList = coordinator_pb2.WorkerList
ListLinksRequest = coordinator_pb2.ListLinksRequest
LinkList = coordinator_pb2.LinkList
PlanInfo = coordinator_pb2.PlanInfo


def add_coordinator_servicer(server: grpc.aio.Server, servicer: CoordinatorServicerBase) -> None:
    """Serve the coordinator API from `servicer` on `server`."""
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)


def registration_from_pb(r: RegisterRequest) -> Registration:
    res = r.resources
    return Registration(
        name=r.name,
        address=r.address,
        gflops=res.gflops,
        memory_bytes=res.memory_bytes,
        device=res.device,
        threads=res.threads,
        worker_id=r.worker_id,
        csr=r.csr,
    )


def register_reply_pb(w: WorkerState, heartbeat_s: float, keys: WorkerKeys) -> RegisterReply:
    return RegisterReply(
        worker_id=w.worker_id,
        heartbeat_interval_s=heartbeat_s,
        credential=keys.credential,
        coordinator_credential=keys.coordinator,
        certificate=keys.certificate,
    )


@dataclass(frozen=True)
class Beat:
    """One heartbeat: the worker, and what it says it is doing (job id, epoch, step and its
    stage's state)."""

    worker_id: str
    reported: tuple[str, int, int, str]


def heartbeat_from_pb(r: HeartbeatRequest) -> Beat:
    return Beat(r.worker_id, (r.job_id, r.epoch, r.step, r.state))


def heartbeat_reply_pb(stop_jobs: Sequence[str] | None) -> HeartbeatReply:
    """The answer to a heartbeat: the jobs to drop, or None for a worker no longer known."""
    if stop_jobs is None:
        return HeartbeatReply(known=False)
    return HeartbeatReply(known=True, stop_jobs=stop_jobs)


def leaving_worker_id(r: LeaveRequest) -> str:
    return r.worker_id


def empty_pb() -> Empty:
    return Empty()


async def open_checkpoint(
    parts: AsyncIterator[CheckpointPart],
) -> tuple[CheckpointUpload, IncomingTensors]:
    """An UploadCheckpoint stream's header, and its tensors still to come (StreamError for
    a stream that does not start with it)."""
    h, incoming = await open_stream(parts, "header")
    upload = CheckpointUpload(
        worker_id=h.worker_id,
        job_id=h.job_id,
        epoch=h.epoch,
        stage=h.stage,
        num_stages=h.num_stages,
        step=h.step,
    )
    return upload, incoming


def spec_yaml_from_pb(r: SubmitJobRequest) -> str:
    return r.spec_yaml


@dataclass(frozen=True)
class JobQuery:
    """Which job a user asks about, and whether with its step metrics."""

    job_id: str
    with_metrics: bool = False


def job_query_from_pb(r: JobRequest) -> JobQuery:
    return JobQuery(r.job_id, r.with_metrics)


def progress_from_pb(r: ProgressReport) -> Progress:
    return Progress(
        worker_id=r.worker_id,
        job_id=r.job_id,
        epoch=r.epoch,
        stage=r.stage,
        step=r.step,
        loss=r.loss if r.has_loss else None,
        step_seconds=r.step_seconds,
        compute_seconds=r.compute_seconds if 0 <= r.compute_seconds < 1e6 else 0.0,
        sent={lb.dst_stage: lb.bytes for lb in r.sent},
        finished=r.finished,
        drained=r.drained,
        error=r.error[:2000],
        replica=r.replica,
        sync_bytes=r.sync_bytes,
        sync_seconds=r.sync_seconds if 0 <= r.sync_seconds < 1e6 else 0.0,
        staleness=r.staleness,
        shares=r.shares,
        speaker=r.speaker,
        suspects=tuple(suspect_from_pb(s) for s in r.suspects[:MAX_SUSPECTS]),
    )


# A report names at most this many suspects (one stage has few senders); the rest are
# dropped, as is evidence beyond its first line's length.
MAX_SUSPECTS = 8


def suspect_from_pb(s: coordinator_pb2.Suspect) -> Suspect:
    return Suspect(
        kind=s.kind[:16],
        stage=s.stage,
        replica=s.replica,
        step=s.step,
        evidence=(s.evidence.splitlines() or [""])[0][:300],
        norm=s.norm,
        bound=s.bound,
    )


def _add_replica_metrics(info: coordinator_pb2.JobInfo, summary: ReplicaMetrics) -> None:
    for r in summary.replicas:
        info.replica_metrics.add(
            replica=r.replica,
            last_step=r.last_step,
            steps=r.steps,
            samples_per_s=r.samples_per_s,
            sync_bytes_per_step=r.sync_bytes_per_step,
            sync_seconds_per_step=r.sync_seconds_per_step,
            staleness=r.staleness,
            speaker=r.speaker,
        )
    for g in summary.groups:
        info.group_metrics.add(
            stage=g.stage,
            replicas=g.replicas,
            steps=g.steps,
            sync_bytes_per_step=g.sync_bytes_per_step,
            sync_seconds_per_step=g.sync_seconds_per_step,
            staleness=g.staleness,
            rounds=g.rounds,
            shares=g.shares,
        )


def job_info_pb(
    job: Job,
    metrics: Sequence[Mapping[str, Any]] = (),
    *,
    recent: Sequence[Mapping[str, Any]] = (),
) -> coordinator_pb2.JobInfo:
    """The job as a client sees it: with `metrics`, every step's loss and the replica and
    group figures; with `recent` (the last steps' records) the figures alone."""
    spec = job.spec
    samples_per_s = spec.data.batch_size / job.step_seconds if job.step_seconds > 0 else 0.0
    remaining = max(spec.steps - job.steps_done, 0)
    info = coordinator_pb2.JobInfo(
        job_id=job.job_id,
        name=job.name,
        state=job.state,
        steps=spec.steps,
        steps_done=job.steps_done,
        loss=job.loss if job.loss is not None else float("nan"),
        has_loss=job.loss is not None,
        val_loss=job.val_loss,
        val_step=job.val_step,
        samples_per_s=samples_per_s,
        eta_s=remaining * job.step_seconds if job.state == "running" else 0.0,
        epoch=job.epoch,
        last_checkpoint=job.last_checkpoint,
        error=job.error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        bytes_per_step=job.bytes_per_step,
        batch_size=spec.data.batch_size,
        recoveries=job.recoveries,
    )
    if job.plan is not None:
        for p in job.plan.placements:
            info.stages.add(
                stage=p.stage,
                worker_id=p.worker_id,
                worker_name=p.worker_name,
                address=p.address,
                nodes=p.nodes,
                params=p.params,
                flops=p.flops,
                replica=p.replica,
            )
    for m in metrics:
        if "loss" in m:
            info.metrics.add(
                step=m["step"],
                loss=m["loss"],
                step_seconds=m.get("step_seconds", 0.0),
                bytes=m.get("bytes", 0),
                epoch=m.get("epoch", 0),
            )
    if metrics or recent:
        _add_replica_metrics(info, summarise_replicas(metrics or recent, epoch=job.epoch))
    return info


def job_list_pb(jobs: Sequence[Job]) -> JobList:
    return JobList(jobs=[job_info_pb(j) for j in jobs])


# An exclusion's reason as listed (it quotes a refused value's evidence; a message stays small).
MAX_REASON_CHARS = 500


def worker_list_pb(workers: Sequence[WorkerState], registry: Registry | None = None) -> WorkerList:
    return WorkerList(workers=[worker_info_pb(w, registry) for w in workers])


def worker_info_pb(w: WorkerState, registry: Registry | None = None) -> coordinator_pb2.WorkerInfo:
    """A worker as listed; with `registry`, also its exclusion and the speed planned with."""
    excluded, excluded_for_s, planned, reachable = "", 0.0, w.gflops, True
    if registry is not None:
        planned = registry.planning_gflops(w)
        if registry.capacity is not None:
            reachable = registry.capacity.reachable(w.worker_id, w.address)
        exclusion = registry.exclusions.get(w.worker_id) if registry.exclusions else None
        if exclusion is not None:
            excluded = exclusion.reason[:MAX_REASON_CHARS]
            if exclusion.until is not None:
                excluded_for_s = max(0.0, exclusion.until - time.time())
    return coordinator_pb2.WorkerInfo(
        excluded=excluded,
        excluded_for_s=excluded_for_s,
        planned_gflops=planned,
        reachable=reachable,
        relayed=registry.relayed(w.address) if registry is not None else False,  # -- relay
        worker_id=w.worker_id,
        name=w.name,
        address=w.address,
        resources=coordinator_pb2.WorkerResources(
            gflops=w.gflops, memory_bytes=w.memory_bytes, device=w.device, threads=w.threads
        ),
        state=w.state,
        job_id=w.job_id,
        last_seen_s=max(0.0, time.monotonic() - w.last_seen),
    )


def link_list_pb(rows: Sequence[Mapping[str, Any]], registry: Registry) -> coordinator_pb2.LinkList:
    """The measured links, with the workers' names."""

    def name(worker_id: str) -> str:
        w = registry.get(worker_id)
        return w.name if w is not None else worker_id

    return coordinator_pb2.LinkList(
        links=[
            coordinator_pb2.LinkInfo(
                src=r["src"],
                dst=r["dst"],
                src_name=name(r["src"]),
                dst_name=name(r["dst"]),
                bandwidth=r["bandwidth"],
                rtt_s=r["rtt_s"],
                age_s=r["age_s"],
            )
            for r in rows
            if not r.get("error")
        ]
    )


def plan_info_pb(job: Job, report: PlanReport) -> coordinator_pb2.PlanInfo:
    plan = job.plan
    assert plan is not None
    return coordinator_pb2.PlanInfo(
        job_id=job.job_id,
        epoch=plan.epoch,
        planner=plan.planner,
        text=plan.explanation,
        predicted_step_s=plan.predicted_step_s,
        measured_step_s=report.measured_step_s,
        calibrated_step_s=report.calibrated_step_s,
        stages=[coordinator_pb2.StageTimes(**dataclasses.asdict(t)) for t in report.stages],
    )
