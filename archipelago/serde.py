"""The user's client's serialisation boundary: the requests it sends the coordinator and
the views it makes of the answers.

The only module of `archipelago` that touches generated classes; `archipelago.client`
calls these around each call.
"""

from __future__ import annotations

import math

import grpc

from archipelago.views import (
    EventView,
    GroupView,
    JobView,
    LinkView,
    PlanView,
    RecordView,
    ReplicaView,
    StageView,
    StepView,
    WorkerView,
)
from proto import coordinator_pb2, coordinator_pb2_grpc

CoordinatorStub = coordinator_pb2_grpc.CoordinatorStub


def coordinator_stub(channel: grpc.Channel) -> CoordinatorStub:
    """The coordinator API over a blocking `channel`."""
    return CoordinatorStub(channel)


# -- requests --------------------------------------------------------------------------------


def events_request(job_id: str, after_seq: int, limit: int) -> coordinator_pb2.EventsRequest:
    return coordinator_pb2.EventsRequest(job_id=job_id, after_seq=after_seq, limit=limit)


def records_request(job_id: str, since_step: int = 0) -> coordinator_pb2.RecordsRequest:
    return coordinator_pb2.RecordsRequest(job_id=job_id, since_step=since_step)


def submit_request(spec_yaml: str) -> coordinator_pb2.SubmitJobRequest:
    return coordinator_pb2.SubmitJobRequest(spec_yaml=spec_yaml)


def job_request(job_id: str, *, with_metrics: bool = False) -> coordinator_pb2.JobRequest:
    return coordinator_pb2.JobRequest(job_id=job_id, with_metrics=with_metrics)


def list_jobs_request() -> coordinator_pb2.ListJobsRequest:
    return coordinator_pb2.ListJobsRequest()


def list_workers_request() -> coordinator_pb2.ListWorkersRequest:
    return coordinator_pb2.ListWorkersRequest()


def list_links_request() -> coordinator_pb2.ListLinksRequest:
    return coordinator_pb2.ListLinksRequest()


# -- answers, as views -----------------------------------------------------------------------


def job_view(pb: coordinator_pb2.JobInfo) -> JobView:
    return JobView(
        job_id=pb.job_id,
        name=pb.name,
        state=pb.state,
        steps=pb.steps,
        steps_done=pb.steps_done,
        # A NaN loss is a reported one when has_loss says so (else: none yet).
        loss=pb.loss if pb.has_loss or not math.isnan(pb.loss) else None,
        samples_per_s=pb.samples_per_s,
        eta_s=pb.eta_s,
        epoch=pb.epoch,
        last_checkpoint=pb.last_checkpoint,
        error=pb.error,
        bytes_per_step=pb.bytes_per_step,
        batch_size=pb.batch_size,
        recoveries=pb.recoveries,
        created_at=pb.created_at,
        val_loss=pb.val_loss if pb.HasField("val_loss") else None,
        val_step=pb.val_step,
        stages=tuple(
            StageView(
                s.stage,
                s.worker_id,
                s.worker_name,
                s.address,
                s.nodes,
                s.params,
                s.flops,
                s.replica,
            )
            for s in pb.stages
        ),
        metrics=tuple(
            StepView(m.step, m.loss, m.step_seconds, m.bytes, m.epoch) for m in pb.metrics
        ),
        replica_metrics=tuple(
            ReplicaView(
                r.replica,
                r.last_step,
                r.steps,
                r.samples_per_s,
                r.sync_bytes_per_step,
                r.sync_seconds_per_step,
                r.staleness,
                r.speaker,
            )
            for r in pb.replica_metrics
        ),
        group_metrics=tuple(
            GroupView(
                g.stage,
                tuple(g.replicas),
                g.steps,
                g.sync_bytes_per_step,
                g.sync_seconds_per_step,
                g.staleness,
                g.rounds,
                g.shares,
            )
            for g in pb.group_metrics
        ),
    )


def job_views(pb: coordinator_pb2.JobList) -> list[JobView]:
    return [job_view(j) for j in pb.jobs]


def worker_views(pb: coordinator_pb2.WorkerList) -> list[WorkerView]:
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
            w.excluded,
            w.excluded_for_s,
            w.planned_gflops,
            w.reachable,
            w.relayed,
        )
        for w in pb.workers
    ]


def link_views(pb: coordinator_pb2.LinkList) -> list[LinkView]:
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
        for link in pb.links
    ]


def plan_view(p: coordinator_pb2.PlanInfo) -> PlanView:
    return PlanView(
        p.job_id,
        p.epoch,
        p.planner,
        p.text,
        p.predicted_step_s,
        p.measured_step_s,
        p.calibrated_step_s,
        tuple(
            (
                s.stage,
                s.predicted_compute_s,
                s.predicted_wait_s,
                s.measured_compute_s,
                s.measured_wait_s,
                s.steps_measured,
            )
            for s in p.stages
        ),
    )


def event_views(pb: coordinator_pb2.EventList) -> list[EventView]:
    return [
        EventView(
            e.seq,
            e.at,
            e.kind,
            e.text,
            e.epoch,
            e.step,
            e.worker_id,
            e.worker_name,
            e.reason,
            e.loss if e.HasField("loss") else None,
        )
        for e in pb.events
    ]


def record_views(page: coordinator_pb2.RecordPage) -> list[RecordView]:
    return [
        RecordView(
            r.step,
            r.stage,
            r.replica,
            r.epoch,
            r.loss if r.HasField("loss") else None,
            r.replica_loss if r.HasField("replica_loss") else None,
            r.step_seconds,
            r.compute_seconds,
            r.samples,
            r.bytes,
            r.sync_bytes,
            r.sync_seconds,
            r.staleness,
            r.shares,
            r.at,
            r.speaker,
        )
        for r in page.records
    ]
