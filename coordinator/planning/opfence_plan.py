"""OP-Fence's plan as data: its stages, cut links and predicted step, and its explanation.

`build_plan` prices a cut and placement with the estimator and records what the plan
needs to be stored (`to_dict`), run (`assignment`, `placement`) and read (`explain`, the
text of `archipelago plan show JOB`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.planning.estimator import NO_CODEC, Estimator, LinkLoad, StepEstimate
from coordinator.planning.links import format_rate
from coordinator.planning.workload import BlockChain
from opdag.ir import Graph
from opdag.partition import partition


@dataclass(frozen=True)
class PlannedStage:
    """One pipeline stage: its nodes, its workers (one per replica) and its predicted cost."""

    stage: int
    workers: tuple[str, ...]
    first: str
    last: str
    nodes: int
    fwd_flops: float
    bwd_flops: float
    params: int
    fwd_s: float  # per micro-batch, on replica 0's worker
    bwd_s: float


@dataclass(frozen=True)
class CutLink:
    """Values crossing from one stage's worker to another's, per micro-batch."""

    src_stage: int
    dst_stage: int
    src_worker: str
    dst_worker: str
    replica: int
    fwd_bytes: int  # activations and data, src -> dst
    bwd_bytes: int  # gradients, dst -> src
    data_bytes: int
    fwd_bandwidth_Bps: float
    bwd_bandwidth_Bps: float
    fwd_s: float  # predicted seconds per micro-batch, latency included
    bwd_s: float
    fwd_codec: str = NO_CODEC
    fwd_ratio: float = 1.0
    bwd_codec: str = NO_CODEC
    bwd_ratio: float = 1.0
    crosses_islands: bool = False


@dataclass(frozen=True)
class OpFencePlan:
    """A planned job: islands, stages and their workers, cut links, predicted step."""

    planner: str
    micro_batches: int
    islands: tuple[tuple[str, ...], ...]
    assignment: Mapping[str, int]
    placement: tuple[tuple[str, ...], ...]  # [replica][stage] -> worker id
    stages: tuple[PlannedStage, ...]
    links: tuple[CutLink, ...]
    estimate: StepEstimate
    blocks: int  # coarse blocks the search cut along

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def replicas(self) -> int:
        return len(self.placement)

    @property
    def stage_workers(self) -> tuple[str, ...]:
        """Stage -> worker id of replica 0."""
        return self.placement[0]

    @property
    def step_s(self) -> float:
        return self.estimate.total_s

    def island_of(self, worker_id: str) -> int:
        """The index of the worker's island (-1 if in none)."""
        return next((i for i, isl in enumerate(self.islands) if worker_id in isl), -1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "planner": self.planner,
            "micro_batches": self.micro_batches,
            "islands": [list(i) for i in self.islands],
            "assignment": dict(self.assignment),
            "placement": [list(r) for r in self.placement],
            "stages": [{**s.__dict__, "workers": list(s.workers)} for s in self.stages],
            "links": [dict(x.__dict__) for x in self.links],
            "estimate": self.estimate.to_dict(),
            "blocks": self.blocks,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OpFencePlan:
        return cls(
            planner=str(d["planner"]),
            micro_batches=int(d["micro_batches"]),
            islands=tuple(tuple(i) for i in d["islands"]),
            assignment={str(k): int(v) for k, v in d["assignment"].items()},
            placement=tuple(tuple(r) for r in d["placement"]),
            stages=tuple(
                PlannedStage(**{**s, "workers": tuple(s["workers"])}) for s in d["stages"]
            ),
            links=tuple(CutLink(**x) for x in d["links"]),
            estimate=StepEstimate.from_dict(d["estimate"]),
            blocks=int(d["blocks"]),
        )

    def explain(self, names: Mapping[str, str] | None = None) -> str:
        """The plan as text: islands, stages and their workers, each cut link's bytes and
        predicted time (for `archipelago plan show JOB`)."""
        label = dict(names or {})

        def who(w: str) -> str:
            return label.get(w, w)

        est = self.estimate
        lines = [
            f"planner {self.planner}: {_count(self.num_stages, 'stage')} x "
            f"{_count(self.replicas, 'replica')}, "
            f"{self.micro_batches} micro-batches per step, {self.blocks} blocks; "
            f"predicted step {est.total_s:.4g} s",
            f"bottleneck: {_named(est.bottleneck, label)}",
            f"islands ({len(self.islands)}):",
        ]
        for i, isl in enumerate(self.islands):
            lines.append(f"  island {i}: {', '.join(who(w) for w in isl)}")
        lines.append("stages (seconds per micro-batch):")
        for s in self.stages:
            where = ", ".join(f"{who(w)} (island {self.island_of(w)})" for w in s.workers)
            lines.append(
                f"  stage {s.stage} on {where}: {s.nodes} nodes {s.first}..{s.last}, "
                f"{(s.fwd_flops + s.bwd_flops) / 1e9:.3g} GFLOP, {s.params:,} params, "
                f"fwd {s.fwd_s * 1e3:.3g} ms + bwd {s.bwd_s * 1e3:.3g} ms"
            )
        lines.append("cut links (bytes and seconds per micro-batch):")
        if not self.links:
            lines.append("  none: one stage")
        for x in self.links:
            span = "CROSSES ISLANDS" if x.crosses_islands else "in island"
            fwd = f"fwd {_format_bytes(x.fwd_bytes)} @ {format_rate(x.fwd_bandwidth_Bps)}bit/s"
            fwd += f" {x.fwd_s * 1e3:.3g} ms" + _codec(x.fwd_codec, x.fwd_ratio)
            if x.data_bytes:
                fwd += f" (data {_format_bytes(x.data_bytes)})"
            bwd = "no gradient back"
            if x.bwd_bytes:
                bwd = f"bwd {_format_bytes(x.bwd_bytes)} @ {format_rate(x.bwd_bandwidth_Bps)}bit/s"
                bwd += f" {x.bwd_s * 1e3:.3g} ms" + _codec(x.bwd_codec, x.bwd_ratio)
            rep = f" [replica {x.replica}]" if self.replicas > 1 else ""
            lines.append(
                f"  stage {x.src_stage}->{x.dst_stage} {who(x.src_worker)}->{who(x.dst_worker)}"
                f"{rep} {span}: {fwd}; {bwd}"
            )
        if any(est.averaging_s):
            sent = est.averaging_bytes or (0,) * len(est.averaging_s)
            lines.append(
                "replica averaging per stage, all-to-all, per step amortised over the sync "
                "period: "
                + ", ".join(
                    f"{x:.3g} s ({_format_bytes(b)} sent per member)"
                    for x, b in zip(est.averaging_s, sent, strict=True)
                )
            )
        return "\n".join(lines)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _named(text: str, names: Mapping[str, str]) -> str:
    """`text` with every worker id in it replaced by the worker's name."""
    for worker_id, name in names.items():
        text = text.replace(worker_id, name)
    return text


def _format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _codec(codec: str, ratio: float) -> str:
    return "" if codec == NO_CODEC else f" ({codec}, x{ratio:.3g})"


def build_plan(
    planner: str,
    graph: Graph,
    chain: BlockChain,
    starts: Sequence[int],
    placement: tuple[tuple[str, ...], ...],
    islands: tuple[tuple[str, ...], ...],
    est: Estimator,
    micro_batches: int,
    *,
    blocks: int | None = None,
) -> OpFencePlan:
    """The plan `planner` found: stages of `chain` beginning at blocks `starts` on
    `placement[replica][stage]`, priced by `est`; `blocks` is the coarse block count the
    search cut along (by default, `chain`'s)."""
    starts = tuple(starts)
    load = chain.load(starts)
    estimate = est.step(load, placement, micro_batches=micro_batches)
    coarse = chain.merge(starts)
    stages = []
    for s, st in enumerate(load.stages):
        f, b = est.stage_seconds(st, placement[0][s])
        members = coarse.members[s] if coarse.members else ()
        stages.append(
            PlannedStage(
                stage=s,
                workers=tuple(r[s] for r in placement),
                first=members[0] if members else "",
                last=members[-1] if members else "",
                nodes=st.nodes,
                fwd_flops=st.fwd_flops,
                bwd_flops=st.bwd_flops,
                params=st.params,
                fwd_s=f,
                bwd_s=b,
            )
        )
    island = {w: i for i, isl in enumerate(islands) for w in isl}
    loads: dict[tuple[int, int, int, str], LinkLoad] = {
        (x.replica, min(x.src_stage, x.dst_stage), max(x.src_stage, x.dst_stage), x.direction): x
        for x in estimate.links
    }
    m = estimate.micro_batches
    cut_links = []
    for r, workers in enumerate(placement):
        for t in load.transfers:
            a, d = workers[t.src], workers[t.dst]
            fwd, bwd = loads.get((r, t.src, t.dst, "fwd")), loads.get((r, t.src, t.dst, "bwd"))
            cut_links.append(
                CutLink(
                    src_stage=t.src,
                    dst_stage=t.dst,
                    src_worker=a,
                    dst_worker=d,
                    replica=r,
                    fwd_bytes=t.fwd_bytes + t.data_bytes,
                    bwd_bytes=t.bwd_bytes,
                    data_bytes=t.data_bytes,
                    fwd_bandwidth_Bps=est.links.bandwidth(a, d),
                    bwd_bandwidth_Bps=est.links.bandwidth(d, a),
                    fwd_s=fwd.busy_s / m + est.links.latency(a, d) if fwd else 0.0,
                    bwd_s=bwd.busy_s / m + est.links.latency(d, a) if bwd else 0.0,
                    fwd_codec=fwd.codec if fwd else NO_CODEC,
                    fwd_ratio=fwd.ratio if fwd else 1.0,
                    bwd_codec=bwd.codec if bwd else NO_CODEC,
                    bwd_ratio=bwd.ratio if bwd else 1.0,
                    crosses_islands=island.get(a) != island.get(d),
                )
            )
    return OpFencePlan(
        planner=planner,
        micro_batches=micro_batches,
        islands=islands,
        # Validated, and completed with the parameter reads, by the partitioner itself.
        assignment=dict(partition(graph, chain.assignment(starts)).assignment),
        placement=placement,
        stages=tuple(stages),
        links=tuple(cut_links),
        estimate=estimate,
        blocks=len(chain.blocks) if blocks is None else blocks,
    )
