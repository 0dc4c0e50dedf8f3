"""Turning a job and the free workers into a plan: the planner the spec asks for, run on
the measured links and the calibrated compute model, its result made into the `Plan` the
coordinator stores and hands out.

`opfence` searches cuts, stage count and placement for the lowest predicted step time; a
spec that fixes the stage count gets exactly that many stages (OP-Fence's plan when it
finds one of that size, else FLOPs-balanced stages on the best of a few island-aware
worker orders, chosen by the same estimator). `even` is the FLOPs-balanced cut in
registration order, priced by the same estimator so the two can be compared.

A spec that fixes the replica count R gets R pipelines of the same cut, each over its own
workers (`even`: replica after replica in registration order; `opfence`: its own search up
to R replicas, else the fixed-size plan above, R times over); `auto` lets OP-Fence choose.
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
from coordinator.planning.opfence_plan import OpFencePlan, build_plan
from coordinator.planning.plan import (
    Placement,
    Plan,
    WorkerSlot,
    describe_sync_groups,
    placement_of,
    plan_even,
)
from coordinator.planning.stage_sync import group_link_rate, stage_sync_layers
from coordinator.planning.workload import BlockChain, load_from_partition
from opdag.ir import Graph
from opdag.partition import Partition, balanced_assignment, partition
from opdag.schedule import in_flight

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
        w if w.gflops > 0 else WorkerSlot(w.worker_id, w.name, w.address, floor, w.memory_bytes)
        for w in workers
    ]


def _even_replicas(
    req: PlanRequest,
    order: Sequence[WorkerSlot],
    links: BandwidthMatrix,
    *,
    stages: int,
    replicas: int,
    planner: str = "even",
) -> OpFencePlan:
    """FLOPs-balanced `stages`, `replicas` times over: replica r on workers
    `order[r*stages:(r+1)*stages]`, priced (the replicas' averaging by the sync policy
    included) by the estimator. One replica is exactly `plan_even_baseline`."""
    policy = wire_compression(req.spec.compression)
    m = req.spec.data.micro_batches
    if replicas == 1:
        found = plan_even_baseline(
            req.graph,
            order,
            links,
            micro_batches=m,
            stages=stages,
            compression=policy,
            compute_model=req.compute,
            sync=req.spec.sync,
            warmup=req.spec.parallel.warmup,
        )
        return OpFencePlan(**{**found.__dict__, "planner": planner})
    if not 1 <= stages * replicas <= len(order):
        raise ValueError(
            f"cannot place {stages} stages x {replicas} replicas on {len(order)} workers"
        )
    speeds = {w.worker_id: w.gflops for w in order}
    assignment = balanced_assignment(req.graph, stages)
    index = [assignment[node.name] for node in req.graph.compute_nodes]
    starts = (0, *(i for i in range(1, len(index)) if index[i] != index[i - 1]))
    placement = tuple(
        tuple(w.worker_id for w in order[r * stages : (r + 1) * stages]) for r in range(replicas)
    )
    est = Estimator(
        speeds,
        links,
        compute=req.compute,
        compression=policy,
        sync=req.spec.sync,
        warmup=req.spec.parallel.warmup,
        memory={w.worker_id: w.memory_bytes for w in order},
    )
    islands = find_islands(list(speeds), links)
    fine = BlockChain.from_graph(req.graph)
    return build_plan(planner, req.graph, fine, starts, placement, islands, est, m)


def _fixed_stages(
    req: PlanRequest,
    workers: list[WorkerSlot],
    links: BandwidthMatrix,
    n: int,
    replicas: int = 1,
) -> OpFencePlan:
    """Exactly `n` FLOPs-balanced stages (`replicas` times over) on the best of a few
    worker orders: islands one after another (largest and fastest first), and
    registration order."""
    islands = find_islands([w.worker_id for w in workers], links)
    by_id = {w.worker_id: w for w in workers}
    speed = {w.worker_id: w.gflops for w in workers}
    ranked = sorted(islands, key=lambda isl: (-len(isl), -sum(speed[w] for w in isl)))
    island_major = [by_id[w] for isl in ranked for w in sorted(isl, key=lambda w: -speed[w])]
    best: OpFencePlan | None = None
    for order in (island_major, workers):
        cand = _even_replicas(req, order, links, stages=n, replicas=replicas, planner="opfence")
        if best is None or cand.step_s < best.step_s:
            best = cand
    assert best is not None
    return best


def make_plan(req: PlanRequest) -> tuple[Plan, Partition]:
    """The plan for `req`, with its cut; ValueError if it cannot be placed."""
    workers = _usable(req.workers)
    links = link_matrix(req.figures)
    m = req.spec.data.micro_batches
    want = req.spec.parallel.stages
    replicas = req.spec.parallel.replicas
    policy = wire_compression(req.spec.compression)
    if replicas is not None and m % replicas:
        raise ValueError(f"{m} micro-batches do not split evenly over {replicas} replicas")
    if req.spec.parallel.planner == "even":
        r = replicas or 1  # `auto` is one pipeline for `even`: it prices no alternatives
        n = min(len(workers) // r, len(req.graph.compute_nodes)) if want is None else want
        _, cut = plan_even(
            req.graph,
            workers,
            job_id=req.job_id,
            epoch=req.epoch,
            stages=n,
            start_step=req.start_step,
            replicas=r,
        )
        found = _even_replicas(req, workers, links, stages=n, replicas=r)
    else:
        found = plan_opfence(
            req.graph,
            workers,
            links,
            micro_batches=m,
            max_stages=want,
            max_replicas=replicas or len(workers),
            compression=policy,
            compute_model=req.compute,
            sync=req.spec.sync,
            warmup=req.spec.parallel.warmup,
        )
        if (want is not None and found.num_stages != want) or (
            replicas is not None and found.replicas != replicas
        ):
            r = replicas or 1
            n = want or max(1, min(found.num_stages, len(workers) // r))
            found = _fixed_stages(req, workers, links, n, r)
        cut = partition(req.graph, found.assignment)
    by_id = {w.worker_id: w for w in workers}
    placements = [
        placement_of(cut.stages[s], by_id[worker_id], r)
        for r, row in enumerate(found.placement)
        for s, worker_id in enumerate(row)
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
        explanation=_explained(found, tuple(placements), names, req, cut),
        codecs=plan_codecs(found, req.spec.compression),
        warmup_extra=found.estimate.warmup_extra,
        stage_compute_s=found.estimate.stage_compute_s,
    )
    return plan, cut


def _explained(
    found: OpFencePlan,
    placements: tuple[Placement, ...],
    names: Mapping[str, str],
    req: PlanRequest,
    cut: Partition,
) -> str:
    """The plan as `plan show` prints it: OP-Fence's account, then the sync groups (and
    each stage's partial local SGD schedule)."""
    text = f"{found.explain(names)}\n{describe_schedule(found, req)}"
    if found.replicas <= 1:
        return text
    sync = req.spec.sync
    averaging = "gradients averaged every step"
    if sync.kind == "local-sgd":
        averaging = f"local SGD, parameters averaged every {sync.period} steps"
    elif sync.kind == "partial-local-sgd":
        averaging = f"partial local SGD, each layer averaged once every {sync.period} steps"
    text = f"{text}\n{describe_sync_groups(placements, names, averaging)}"
    if sync.kind == "partial-local-sgd":
        for stage in cut.stages:
            members = [p.worker_id for p in placements if p.stage == stage.index]
            rate = group_link_rate(req.figures, members)
            _, schedule = stage_sync_layers(
                stage.graph, found.replicas, sync.period, rate, sync.values
            )
            if schedule is not None:
                text = f"{text}\nstage {stage.index} {schedule.format()}"
    return text


def describe_schedule(found: OpFencePlan, req: PlanRequest) -> str:
    """The micro-batch schedule as `plan show` prints it."""
    m, n, extra = found.estimate.micro_batches, found.num_stages, found.estimate.warmup_extra
    depth = in_flight(0, n, m, extra)
    kind = "GPipe (every forward first)" if depth >= m and n > 1 else "1F1B"
    if extra:
        kind = f"{kind}, {extra} extra warm-up micro-batch{'es' if extra > 1 else ''}"
    why = "the depth whose simulated step ends first"
    if req.spec.parallel.warmup is not None:
        why = f"parallel.warmup: {req.spec.parallel.warmup} in the spec"
    return f"schedule: {kind}; stage 0 holds up to {depth} of its {m} micro-batches ({why})"


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
        sync=spec.sync,
        warmup=plan.warmup_extra,
    )
    estimate = est.step(
        load_from_partition(cut), plan.pipelines(), micro_batches=spec.data.micro_batches
    )
    return estimate.total_s
