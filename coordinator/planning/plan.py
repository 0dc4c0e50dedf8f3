"""Plans: which worker runs which stage of a job, and what each stage sends where.

A plan is plain data, printable and comparable, recorded in the store before any worker is
told about it. It is stages x replicas: each replica is a full pipeline over its own
workers, and the replicas of a stage are that stage's sync group. The `even` planner cuts
the graph into stages of about equal FLOPs and places replica after replica on workers in
the order they registered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opdag.ir import Graph
from opdag.partition import Partition, Stage, balanced_assignment, partition


@dataclass(frozen=True)
class Placement:
    """One stage of one replica on one worker."""

    stage: int
    worker_id: str
    worker_name: str
    address: str
    nodes: int
    params: int
    flops: float
    replica: int = 0


@dataclass(frozen=True)
class LinkCodec:
    """How one cut link's activations travel (the gradients back follow their kept
    entries): the compressor, the kept fraction, the value format, and what the planner
    expects it to move and take per micro-batch."""

    src_stage: int
    dst_stage: int
    codec: str
    ratio: float
    values: str
    dense_bytes: int
    wire_bytes: int
    seconds: float


@dataclass(frozen=True)
class Plan:
    """A job's current plan (its `epoch` counts the plans the job has had)."""

    job_id: str
    epoch: int
    planner: str
    start_step: int
    assignment: Mapping[str, int]
    placements: tuple[Placement, ...]
    # The estimator's step time for this plan, and the plan explained (islands, stages,
    # placement, each cut link's bytes and time), as `archipelago plan show` prints it.
    predicted_step_s: float = 0.0
    explanation: str = ""
    codecs: tuple[LinkCodec, ...] = ()
    # The schedule's extra warm-up every stage runs (`opdag.schedule.one_f_one_b`), as the
    # estimator chose it.
    warmup_extra: int = 0
    # The estimator's busy seconds per stage and step (compute and optimizer step).
    stage_compute_s: tuple[float, ...] = ()

    @property
    def num_stages(self) -> int:
        return len({p.stage for p in self.placements})

    @property
    def replicas(self) -> int:
        return len({p.replica for p in self.placements})

    def pipelines(self) -> tuple[tuple[str, ...], ...]:
        """Worker ids by [replica][stage], as the estimator takes a placement."""
        return tuple(
            tuple(
                p.worker_id
                for p in sorted(self.placements, key=lambda p: p.stage)
                if p.replica == r
            )
            for r in range(self.replicas)
        )

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(p.worker_id for p in self.placements)

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "epoch": self.epoch,
            "planner": self.planner,
            "start_step": self.start_step,
            "assignment": dict(self.assignment),
            "placements": [p.__dict__ for p in self.placements],
            "predicted_step_s": self.predicted_step_s,
            "explanation": self.explanation,
            "codecs": [c.__dict__ for c in self.codecs],
            "warmup_extra": self.warmup_extra,
            "stage_compute_s": list(self.stage_compute_s),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        return cls(
            job_id=d["job_id"],
            epoch=int(d["epoch"]),
            planner=d["planner"],
            start_step=int(d["start_step"]),
            assignment={k: int(v) for k, v in d["assignment"].items()},
            placements=tuple(Placement(**p) for p in d["placements"]),
            # Plans stored before the estimator existed carry neither.
            predicted_step_s=float(d.get("predicted_step_s", 0.0)),
            explanation=str(d.get("explanation", "")),
            codecs=tuple(LinkCodec(**c) for c in d.get("codecs", ())),
            warmup_extra=int(d.get("warmup_extra", 0)),
            stage_compute_s=tuple(float(x) for x in d.get("stage_compute_s", ())),
        )


def describe_sync_groups(
    placements: Sequence[Placement],
    names: Mapping[str, str] | None = None,
    averaging: str = "gradients averaged every step",
) -> str:
    """The replica groups as `plan show` prints them: per stage, its worker in each replica;
    `averaging` says how the groups average."""
    replicas = len({p.replica for p in placements})
    lines = [f"sync groups ({replicas} replicas; {averaging}):"]
    for s in sorted({p.stage for p in placements}):
        members = sorted((p.replica, p.worker_id) for p in placements if p.stage == s)
        shown = ", ".join(f"replica {r} on {(names or {}).get(w, w)}" for r, w in members)
        lines.append(f"  stage {s}: {shown}")
    return "\n".join(lines)


@dataclass(frozen=True)
class WorkerSlot:
    """What the planner needs to know of a free worker."""

    worker_id: str
    name: str
    address: str
    gflops: float
    # The memory the worker claims (bounded, not measured); 0: unknown, nothing assumed.
    memory_bytes: int = 0


def placement_of(stage: Stage, worker: WorkerSlot, replica: int = 0) -> Placement:
    """`stage` of `replica` placed on `worker`, with the sizes `status` shows."""
    g = stage.graph
    return Placement(
        stage=stage.index,
        worker_id=worker.worker_id,
        worker_name=worker.name,
        address=worker.address,
        nodes=len(g.compute_nodes),
        params=g.num_params(),
        flops=g.total("fwd_flops") + g.total("bwd_flops"),
        replica=replica,
    )


def plan_even(
    graph: Graph,
    workers: Sequence[WorkerSlot],
    *,
    job_id: str,
    epoch: int,
    stages: int,
    start_step: int,
    replicas: int = 1,
) -> tuple[Plan, Partition]:
    """`stages` FLOPs-balanced stages, `replicas` times over, on the first
    `stages * replicas` workers in registration order (replica 0 on the first ones)."""
    if stages < 1 or replicas < 1 or stages * replicas > len(workers):
        raise ValueError(
            f"cannot place {stages} stages x {replicas} replicas on {len(workers)} workers"
        )
    assignment = balanced_assignment(graph, stages)
    cut = partition(graph, assignment)
    placements = [
        placement_of(stage, workers[r * stages + stage.index], r)
        for r in range(replicas)
        for stage in cut.stages
    ]
    plan = Plan(
        job_id=job_id,
        epoch=epoch,
        planner="even",
        start_step=start_step,
        assignment=dict(cut.assignment),
        placements=tuple(placements),
    )
    return plan, cut


def stage_routes(cut: Partition) -> list[dict[str, dict[str, tuple[int, ...]]]]:
    """For every stage: what it sends (value -> stages), receives (value -> (stage,)), and,
    for stage 0, the data inputs it loads and sends on (input -> stages)."""
    routes: list[dict[str, dict[str, tuple[int, ...]]]] = [
        {"sends": {}, "receives": {}, "data": {}} for _ in cut.stages
    ]
    for edge in cut.edges:
        routes[edge.src]["sends"][edge.node] = edge.dsts
        for dst in edge.dsts:
            routes[dst]["receives"][edge.node] = (edge.src,)
    for stage in cut.stages:
        if stage.index == 0:
            continue
        for name in stage.data_inputs:
            prev = routes[0]["data"].get(name, ())
            routes[0]["data"][name] = (*prev, stage.index)
    return routes
