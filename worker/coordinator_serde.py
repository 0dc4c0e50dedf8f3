"""The worker's messages to and from the coordinator: registration, heartbeats, leaving,
step reports and checkpoint uploads (the rest of the worker's serde is `worker.serde`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.streams import stream_parts
from proto.tensor_stream import header_of
from worker.resources import Resources
from worker.stage_plan import StagePlan

if TYPE_CHECKING:
    from worker.step_report import StepReport

CoordinatorStub = coordinator_pb2_grpc.CoordinatorStub
ProgressReport = coordinator_pb2.ProgressReport


def coordinator_stub(channel: grpc.aio.Channel) -> CoordinatorStub:
    """The coordinator API over `channel`."""
    return CoordinatorStub(channel)


@dataclass(frozen=True)
class Registration:
    """The coordinator's answer to a registration: this worker's id, how often to beat, its
    own credential and the coordinator's toward it."""

    worker_id: str
    heartbeat_s: float
    credential: str = ""
    coordinator_credential: str = ""
    certificate: bytes = b""  # over TLS: this worker's server certificate


@dataclass(frozen=True)
class HeartbeatAnswer:
    """The coordinator's answer to a heartbeat: whether it knows this worker, and the jobs
    it has dropped that this worker should stop."""

    known: bool
    stop_jobs: tuple[str, ...]


def register_request_pb(
    *, name: str, address: str, worker_id: str, resources: Resources, csr: bytes = b""
) -> coordinator_pb2.RegisterRequest:
    return coordinator_pb2.RegisterRequest(
        name=name,
        address=address,
        worker_id=worker_id,
        csr=csr,
        resources=coordinator_pb2.WorkerResources(
            gflops=resources.gflops,
            memory_bytes=resources.memory_bytes,
            device=resources.device,
            threads=resources.threads,
        ),
    )


def registration_from_pb(reply: coordinator_pb2.RegisterReply) -> Registration:
    return Registration(
        worker_id=reply.worker_id,
        heartbeat_s=reply.heartbeat_interval_s or 1.0,
        credential=reply.credential,
        coordinator_credential=reply.coordinator_credential,
        certificate=reply.certificate,
    )


def heartbeat_request_pb(
    *, worker_id: str, job_id: str, epoch: int, step: int, state: str
) -> coordinator_pb2.HeartbeatRequest:
    return coordinator_pb2.HeartbeatRequest(
        worker_id=worker_id, job_id=job_id, epoch=epoch, step=step, state=state
    )


def heartbeat_answer_from_pb(reply: coordinator_pb2.HeartbeatReply) -> HeartbeatAnswer:
    return HeartbeatAnswer(known=reply.known, stop_jobs=tuple(reply.stop_jobs))


def leave_request_pb(worker_id: str) -> coordinator_pb2.LeaveRequest:
    return coordinator_pb2.LeaveRequest(worker_id=worker_id)


def progress_report_pb(worker_id: str, report: StepReport) -> coordinator_pb2.ProgressReport:
    return coordinator_pb2.ProgressReport(
        worker_id=worker_id,
        job_id=report.job_id,
        epoch=report.epoch,
        stage=report.stage,
        step=report.step,
        has_loss=report.loss is not None,
        loss=report.loss or 0.0,
        step_seconds=report.step_seconds,
        compute_seconds=report.compute_seconds,
        sent=[
            coordinator_pb2.LinkBytes(dst_stage=d, bytes=b) for d, b in sorted(report.sent.items())
        ],
        finished=report.finished,
        drained=report.drained,
        error=report.error,
        replica=report.replica,
        sync_bytes=report.sync_bytes,
        sync_seconds=report.sync_seconds,
        staleness=report.staleness,
        shares=report.shares,
        speaker=report.speaker,
        suspects=[
            coordinator_pb2.Suspect(
                kind=s.kind,
                stage=s.stage,
                replica=s.replica,
                step=s.step,
                evidence=s.evidence,
                norm=s.norm,
                bound=s.bound,
            )
            for s in report.suspects
        ],
    )


def checkpoint_parts(
    *, worker_id: str, plan: StagePlan, step: int, tensors: Mapping[str, torch.Tensor]
) -> Callable[[], AsyncIterator[coordinator_pb2.CheckpointPart]]:
    """The UploadCheckpoint stream of a stage's state after `step` steps: a function that
    makes it afresh, once for each try."""
    items = list(tensors.items())
    header = coordinator_pb2.CheckpointHeader(
        worker_id=worker_id,
        job_id=plan.job_id,
        epoch=plan.epoch,
        stage=plan.stage,
        num_stages=plan.num_stages,
        step=step,
        tensors=[header_of(name, t) for name, t in items],
    )

    def parts() -> AsyncIterator[coordinator_pb2.CheckpointPart]:
        return stream_parts(coordinator_pb2.CheckpointPart, "header", header, [t for _, t in items])

    return parts
