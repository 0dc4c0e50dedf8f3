"""Turning a job and the free workers into a plan: the planner the spec asks for, run on
the measured links and the calibrated compute model, its result made into the `Plan` the
coordinator stores and hands out.

`opfence` searches cuts, stage count and placement for the lowest predicted step time; a
spec that fixes the stage count gets exactly that many stages (OP-Fence's plan when it
finds one of that size, else FLOPs-balanced stages on the best of a few island-aware
worker orders, chosen by the same estimator). `even` is the FLOPs-balanced cut in
registration order, priced by the same estimator so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.planning.compute import ComputeModel
from coordinator.planning.estimator import Estimator
from coordinator.planning.islands import find_islands
from coordinator.planning.jobspec import JobSpec
from coordinator.planning.link_compression import plan_codecs, wire_compression
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.opfence import plan_even_baseline, plan_opfence
from coordinator.planning.opfence_plan import OpFencePlan
from coordinator.planning.plan import Plan, WorkerSlot, placement_of, plan_even
from coordinator.planning.workload import load_from_partition
from opdag.ir import Graph
from opdag.partition import Partition, partition

# With no link measured at all (one worker, or probes not back yet), links are taken as
# a fast LAN; with some measured, an unmeasured pair counts as the slowest one measured.
UNMEASURED_BANDWIDTH_BPS = 125e6
UNMEASURED_RTT_S = 1e-3


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan is made from."""

    job_id: str
    epoch: int
    start_step: int
    graph: Graph
    spec: JobSpec
    workers: Sequence[WorkerSlot]
    figures: Mapping[tuple[str, str], tuple[float, float]]
    compute: ComputeModel


def link_matrix(figures: Mapping[tuple[str, str], tuple[float, float]]) -> BandwidthMatrix:
    if not figures:
        return BandwidthMatrix(
            default_bandwidth_Bps=UNMEASURED_BANDWIDTH_BPS, default_rtt_s=UNMEASURED_RTT_S
        )
    return BandwidthMatrix.of(figures)


def _usable(workers: Sequence[WorkerSlot]) -> list[WorkerSlot]:
    # A worker that reported no speed is given the slowest speed seen: it still counts.
    speeds = [w.gflops for w in workers if w.gflops > 0]
    floor = min(speeds) if speeds else 1.0
    return [
        w if w.gflops > 0 else WorkerSlot(w.worker_id, w.name, w.address, floor) for w in workers
    ]


def _fixed_stages(
    req: PlanRequest, workers: list[WorkerSlot], links: BandwidthMatrix, n: int
) -> OpFencePlan:
    """Exactly `n` FLOPs-balanced stages on the best of a few worker orders: islands one
    after another (largest and fastest first), and registration order."""
    m = req.spec.data.micro_batches
    policy = wire_compression(req.spec.compression)
    islands = find_islands([w.worker_id for w in workers], links)
    by_id = {w.worker_id: w for w in workers}
    speed = {w.worker_id: w.gflops for w in workers}
    ranked = sorted(islands, key=lambda isl: (-len(isl), -sum(speed[w] for w in isl)))
    island_major = [by_id[w] for isl in ranked for w in sorted(isl, key=lambda w: -speed[w])]
    best: OpFencePlan | None = None
    for order in (island_major, workers):
        cand = plan_even_baseline(
            req.graph,
            order,
            links,
            micro_batches=m,
            stages=n,
            compression=policy,
            compute_model=req.compute,
        )
        if best is None or cand.step_s < best.step_s:
            best = cand
    assert best is not None
    return OpFencePlan(**{**best.__dict__, "planner": "opfence"})


def make_plan(req: PlanRequest) -> tuple[Plan, Partition]:
    """The plan for `req`, with its cut; ValueError if it cannot be placed."""
    workers = _usable(req.workers)
    links = link_matrix(req.figures)
    m = req.spec.data.micro_batches
    want = req.spec.parallel.stages
    policy = wire_compression(req.spec.compression)
    if req.spec.parallel.planner == "even":
        n = min(len(workers), len(req.graph.compute_nodes)) if want is None else want
        _, cut = plan_even(
            req.graph,
            workers,
            job_id=req.job_id,
            epoch=req.epoch,
            stages=n,
            start_step=req.start_step,
        )
        found = plan_even_baseline(
            req.graph,
            workers,
            links,
            micro_batches=m,
            stages=n,
            compression=policy,
            compute_model=req.compute,
        )
    else:
        found = plan_opfence(
            req.graph,
            workers,
            links,
            micro_batches=m,
            max_stages=want,
            compression=policy,
            compute_model=req.compute,
        )
        if want is not None and found.num_stages != want:
            found = _fixed_stages(req, workers, links, want)
        cut = partition(req.graph, found.assignment)
    by_id = {w.worker_id: w for w in workers}
    placements = [
        placement_of(stage, by_id[worker_id])
        for stage, worker_id in zip(cut.stages, found.stage_workers, strict=True)
    ]
    names = {w.worker_id: w.name for w in workers}
    plan = Plan(
        job_id=req.job_id,
        epoch=req.epoch,
        planner=req.spec.parallel.planner,
        start_step=req.start_step,
        assignment=dict(cut.assignment),
        placements=tuple(placements),
        predicted_step_s=found.step_s,
        explanation=found.explain(names),
        codecs=plan_codecs(found, req.spec.compression),
    )
    return plan, cut


def predict(
    plan: Plan,
    graph: Graph,
    spec: JobSpec,
    speeds: Mapping[str, float],
    figures: Mapping[tuple[str, str], tuple[float, float]],
    compute: ComputeModel,
) -> float:
    """The step time of an existing plan under `compute` (e.g. one calibrated since)."""
    cut = partition(graph, plan.assignment)
    usable = {w: (s if s > 0 else 1.0) for w, s in speeds.items()}
    est = Estimator(
        usable,
        link_matrix(figures),
        compute=compute,
        compression=wire_compression(spec.compression),
    )
    estimate = est.step(
        load_from_partition(cut), (plan.worker_ids,), micro_batches=spec.data.micro_batches
    )
    return estimate.total_s
