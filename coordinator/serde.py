"""The coordinator's serialisation boundary: its dataclasses to protobuf messages and back.

Only this module (and the thin servicer that calls it) sees coordinator-side generated
classes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from coordinator.handover import StageHandover
from coordinator.registry import Registry, WorkerState
from opdag import graph_serde
from proto import coordinator_pb2, worker_pb2
from proto.tensor_stream import header_of

if TYPE_CHECKING:
    from coordinator.jobs import Job, PlanReport, Progress


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
        peers=[
            worker_pb2.Peer(stage=p.stage, address=p.address)
            for p in plan.placements
            if p.stage != stage.index
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
        job_secret=secret,
        tensors=[header_of(name, t) for name, t in tensors],
    )


def progress_from_pb(r: coordinator_pb2.ProgressReport) -> Progress:
    from coordinator.jobs import Progress

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
    )


def job_info_pb(job: Job, metrics: Sequence[Mapping[str, Any]] = ()) -> coordinator_pb2.JobInfo:
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
    return info


def worker_info_pb(w: WorkerState) -> coordinator_pb2.WorkerInfo:
    return coordinator_pb2.WorkerInfo(
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
    )
