"""The user's side of the coordinator API (submit, status, watch, cancel), as plain data."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from proto import coordinator_pb2, coordinator_pb2_grpc
from proto.rpc import TlsConfig, open_blocking_channel, token_metadata


class ClientError(Exception):
    """The coordinator could not be reached or refused the request."""


@dataclass(frozen=True)
class StageView:
    stage: int
    worker_id: str
    worker_name: str
    address: str
    nodes: int
    params: int
    flops: float


@dataclass(frozen=True)
class StepView:
    step: int
    loss: float
    step_seconds: float
    bytes: int
    epoch: int


@dataclass(frozen=True)
class JobView:
    job_id: str
    name: str
    state: str
    steps: int
    steps_done: int
    loss: float | None
    samples_per_s: float
    eta_s: float
    epoch: int
    last_checkpoint: int
    error: str
    bytes_per_step: int
    batch_size: int
    recoveries: int
    created_at: float
    stages: tuple[StageView, ...] = ()
    metrics: tuple[StepView, ...] = field(default_factory=tuple)

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    name: str
    address: str
    state: str
    job_id: str
    gflops: float
    memory_bytes: int
    device: str
    last_seen_s: float


@dataclass(frozen=True)
class LinkView:
    """One measured directed link between two workers."""

    src: str
    dst: str
    src_name: str
    dst_name: str
    bandwidth: float  # bytes per second
    rtt_s: float
    age_s: float


@dataclass(frozen=True)
class PlanView:
    """A job's plan explained, with its predicted and measured step times."""

    job_id: str
    epoch: int
    planner: str
    text: str
    predicted_step_s: float
    measured_step_s: float
    calibrated_step_s: float


def _job(pb: coordinator_pb2.JobInfo) -> JobView:
    return JobView(
        job_id=pb.job_id,
        name=pb.name,
        state=pb.state,
        steps=pb.steps,
        steps_done=pb.steps_done,
        loss=None if math.isnan(pb.loss) else pb.loss,
        samples_per_s=pb.samples_per_s,
        eta_s=pb.eta_s,
        epoch=pb.epoch,
        last_checkpoint=pb.last_checkpoint,
        error=pb.error,
        bytes_per_step=pb.bytes_per_step,
        batch_size=pb.batch_size,
        recoveries=pb.recoveries,
        created_at=pb.created_at,
        stages=tuple(
            StageView(s.stage, s.worker_id, s.worker_name, s.address, s.nodes, s.params, s.flops)
            for s in pb.stages
        ),
        metrics=tuple(
            StepView(m.step, m.loss, m.step_seconds, m.bytes, m.epoch) for m in pb.metrics
        ),
    )


class CoordinatorClient:
    """Blocking calls to a coordinator, with errors turned into `ClientError`s."""

    def __init__(
        self, address: str, *, token: str, tls: TlsConfig | None = None, timeout_s: float = 30.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = open_blocking_channel(address, tls)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self._metadata = token_metadata(token)

    def _call(self, method: str, request: object, **kw: object) -> object:
        try:
            return getattr(self._stub, method)(
                request, metadata=self._metadata, timeout=kw.get("timeout", self.timeout_s)
            )
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> ClientError:
        code = e.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return ClientError(f"cannot reach the coordinator at {self.address}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return ClientError(
                "the coordinator refused the token (set --token or ARCHIPELAGO_TOKEN)"
            )
        return ClientError(str(e.details()))

    def submit(self, spec_yaml: str) -> JobView:
        reply = self._call(
            "SubmitJob", coordinator_pb2.SubmitJobRequest(spec_yaml=spec_yaml), timeout=120
        )
        return _job(reply)  # type: ignore[arg-type]

    def job(self, job_id: str, *, with_metrics: bool = False) -> JobView:
        reply = self._call(
            "GetJob", coordinator_pb2.JobRequest(job_id=job_id, with_metrics=with_metrics)
        )
        return _job(reply)  # type: ignore[arg-type]

    def jobs(self) -> list[JobView]:
        reply = self._call("ListJobs", coordinator_pb2.ListJobsRequest())
        return [_job(j) for j in reply.jobs]  # type: ignore[attr-defined]

    def cancel(self, job_id: str) -> JobView:
        return _job(self._call("CancelJob", coordinator_pb2.JobRequest(job_id=job_id)))  # type: ignore[arg-type]

    def watch(self, job_id: str) -> Iterator[JobView]:
        try:
            for info in self._stub.WatchJob(
                coordinator_pb2.JobRequest(job_id=job_id), metadata=self._metadata
            ):
                yield _job(info)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def workers(self) -> list[WorkerView]:
        reply = self._call("ListWorkers", coordinator_pb2.ListWorkersRequest())
        return [
            WorkerView(
                w.worker_id,
                w.name,
                w.address,
                w.state,
                w.job_id,
                w.resources.gflops,
                w.resources.memory_bytes,
                w.resources.device,
                w.last_seen_s,
            )
            for w in reply.workers  # type: ignore[attr-defined]
        ]

    def links(self) -> list[LinkView]:
        reply = self._call("ListLinks", coordinator_pb2.ListLinksRequest())
        return [
            LinkView(
                link.src,
                link.dst,
                link.src_name,
                link.dst_name,
                link.bandwidth,
                link.rtt_s,
                link.age_s,
            )
            for link in reply.links  # type: ignore[attr-defined]
        ]

    def plan(self, job_id: str) -> PlanView:
        p = self._call("GetPlan", coordinator_pb2.JobRequest(job_id=job_id))
        return PlanView(
            p.job_id,  # type: ignore[attr-defined]
            p.epoch,  # type: ignore[attr-defined]
            p.planner,  # type: ignore[attr-defined]
            p.text,  # type: ignore[attr-defined]
            p.predicted_step_s,  # type: ignore[attr-defined]
            p.measured_step_s,  # type: ignore[attr-defined]
            p.calibrated_step_s,  # type: ignore[attr-defined]
        )

    def close(self) -> None:
        self._channel.close()
