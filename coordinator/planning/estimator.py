"""The workload estimator: how long a plan's training step will take.

Three models, each small enough to check by hand:

- compute: a node's FLOPs over the worker's probed speed times a fitted efficiency, plus a
  fixed overhead per node (`ComputeModel`; `fit_compute_model` refits both from the per-stage
  seconds of profiled steps);
- transfer: bytes over the link's bandwidth plus half its round trip, after an optional
  compression policy has chosen a codec for the link;
- step: an event simulation of the pipeline's one-forward-one-backward schedule. Each stage
  runs its ops in order, an op starts when its stage is free and its inputs have arrived,
  every directed worker pair is a FIFO link, forward and backward traffic travel on
  separate links, and each stage's optimizer steps after its last backward (after the
  all-reduce of its gradients when the plan has replicas).

The planner calls `Estimator.step` many times, so the simulation is lean and memoised.
"""

from __future__ import annotations

import bisect
import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from coordinator.planning.links import BandwidthMatrix
from opdag.ir import Graph, Node, ValueMeta
from opdag.partition import Partition

# -- compression hook -------------------------------------------------------------------


class WireCompression(Protocol):
    """A compression policy (implemented elsewhere): for a tensor of `dense_bytes` on a
    link of `bandwidth_Bps` that should take about `budget_s`, the codec to use, its
    compression ratio and the bytes it puts on the wire."""

    def __call__(
        self, dense_bytes: int, bandwidth_Bps: float, budget_s: float
    ) -> tuple[str, float, int]: ...


NO_CODEC = "none"

# -- compute model ----------------------------------------------------------------------


@dataclass(frozen=True)
class ComputeModel:
    """How FLOPs turn into seconds on a worker.

    `efficiency` is the fraction of the probed matmul speed a worker reaches on real
    operators (workers not listed get `default_efficiency`); every node also costs
    `node_overhead_s` in each direction (dispatch, small kernels). The optimizer step costs
    `step_flops_per_param` FLOPs per trainable parameter.
    """

    efficiency: Mapping[str, float] = field(default_factory=dict)
    default_efficiency: float = 1.0
    node_overhead_s: float = 0.0
    step_flops_per_param: float = 10.0

    def rate(self, worker_id: str, gflops: float) -> float:
        """FLOPs per second the worker reaches."""
        if gflops <= 0:
            raise ValueError(f"worker {worker_id}: speed {gflops!r} GFLOP/s must be > 0")
        return gflops * 1e9 * self.efficiency.get(worker_id, self.default_efficiency)

    def seconds(self, flops: float, nodes: int, worker_id: str, gflops: float) -> float:
        """Time of one direction (forward or backward) of `nodes` nodes doing `flops`."""
        return flops / self.rate(worker_id, gflops) + nodes * self.node_overhead_s

    def node_seconds(self, node: Node, worker_id: str, gflops: float) -> tuple[float, float]:
        """Forward and backward seconds of one node for one micro-batch."""
        return self.nodes_seconds((node,), worker_id, gflops)

    def nodes_seconds(
        self, nodes: Sequence[Node], worker_id: str, gflops: float
    ) -> tuple[float, float]:
        """Forward and backward seconds of a set of nodes for one micro-batch."""
        costs = [n.costs for n in nodes if n.op in ("module", "function", "method")]
        fwd = sum(c.fwd_flops for c in costs if c is not None)
        bwd = sum(c.bwd_flops for c in costs if c is not None)
        return (
            self.seconds(fwd, len(costs), worker_id, gflops),
            self.seconds(bwd, len(costs), worker_id, gflops),
        )

    def step_seconds(self, params: int, worker_id: str, gflops: float) -> float:
        """Time of the optimizer step over `params` trainable parameters."""
        return self.step_flops_per_param * params / self.rate(worker_id, gflops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "efficiency": dict(self.efficiency),
            "default_efficiency": self.default_efficiency,
            "node_overhead_s": self.node_overhead_s,
            "step_flops_per_param": self.step_flops_per_param,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ComputeModel:
        return cls(
            efficiency={str(k): float(v) for k, v in d.get("efficiency", {}).items()},
            default_efficiency=float(d.get("default_efficiency", 1.0)),
            node_overhead_s=float(d.get("node_overhead_s", 0.0)),
            step_flops_per_param=float(d.get("step_flops_per_param", 10.0)),
        )


@dataclass(frozen=True)
class StageTiming:
    """Measured forward and backward seconds per micro-batch of one stage on one worker."""

    worker_id: str
    gflops: float
    fwd_flops: float
    bwd_flops: float
    nodes: int
    fwd_s: float
    bwd_s: float


def fit_compute_model(
    timings: Sequence[StageTiming],
    *,
    prior: ComputeModel | None = None,
    fit_overhead: bool = True,
) -> ComputeModel:
    """Refit per-worker efficiency and the per-node overhead from profiled stages.

    Each measured direction gives one equation `t = flops / (gflops * 1e9) * (1 / eff_w)
    + nodes * overhead`, linear in the unknowns `1 / eff_w` and `overhead`; they are solved
    by least squares on relative error (so short stages count as much as long ones). When
    the overhead cannot be told apart from the efficiencies (too few distinct stages) or
    comes out negative, it is kept at the prior's value and each efficiency is a ratio fit.
    Workers without timings keep the prior's efficiency; the default becomes the median of
    the fitted ones.
    """
    prior = prior or ComputeModel()
    rows = [
        (t.worker_id, flops / (t.gflops * 1e9), t.nodes, secs)
        for t in timings
        for flops, secs in ((t.fwd_flops, t.fwd_s), (t.bwd_flops, t.bwd_s))
        if secs > 0
    ]
    workers = sorted({w for w, x, _, _ in rows if x > 0})
    if not workers:
        return prior
    col = {w: i for i, w in enumerate(workers)}
    inverse: dict[str, float] | None = None
    overhead = prior.node_overhead_s
    if fit_overhead:
        a = np.zeros((len(rows), len(workers) + 1))
        y = np.ones(len(rows))
        for r, (w, x, n, secs) in enumerate(rows):
            if w in col:
                a[r, col[w]] = x / secs
            a[r, -1] = n / secs
        solution, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
        if rank == a.shape[1] and solution[-1] >= 0 and all(solution[:-1] > 0):
            inverse = {w: float(solution[col[w]]) for w in workers}
            overhead = float(solution[-1])
    if inverse is None:
        inverse = {}
        for w in workers:
            # Least squares through the origin on relative error, with the overhead fixed.
            num = den = 0.0
            for v, x, n, secs in rows:
                if v == w and x > 0:
                    num += (x / secs) * ((secs - n * overhead) / secs)
                    den += (x / secs) ** 2
            inverse[w] = max(num / den, 1e-9)
    fitted = {w: 1.0 / inverse[w] for w in workers}
    return ComputeModel(
        efficiency={**prior.efficiency, **fitted},
        default_efficiency=statistics.median(fitted.values()),
        node_overhead_s=overhead,
        step_flops_per_param=prior.step_flops_per_param,
    )


# -- the workload: stages and what crosses between them ----------------------------------


@dataclass(frozen=True)
class StageLoad:
    """What one stage computes per micro-batch, and the parameters it steps."""

    fwd_flops: float
    bwd_flops: float
    nodes: int
    params: int = 0
    param_bytes: int = 0


@dataclass(frozen=True)
class Transfer:
    """Bytes per micro-batch between two stages: activations and data forward (data are the
    inputs stage 0 loads and forwards; never compressed), gradients backward."""

    src: int
    dst: int
    fwd_bytes: int
    bwd_bytes: int
    data_bytes: int = 0


@dataclass(frozen=True)
class PipelineLoad:
    """A cut model, reduced to what the step time depends on."""

    stages: tuple[StageLoad, ...]
    transfers: tuple[Transfer, ...]


def grad_bytes(meta: ValueMeta) -> int:
    """Bytes of the gradient that flows back through a value (0 when none does)."""
    if meta.kind == "tensor":
        return meta.nbytes if meta.requires_grad else 0
    return sum(grad_bytes(item) for item in meta.items)


@dataclass(frozen=True)
class Block:
    """A run of consecutive compute nodes that the planner keeps on one stage."""

    fwd_flops: float
    bwd_flops: float
    nodes: int
    params: int = 0
    param_bytes: int = 0


@dataclass(frozen=True)
class ChainValue:
    """A value read outside the block that makes it (data inputs come from block 0)."""

    src: int
    dsts: tuple[int, ...]
    nbytes: int
    grad_bytes: int
    data: bool = False


@dataclass(frozen=True)
class BlockChain:
    """A model as blocks in topological order and the values crossing between them.

    Any contiguous runs of blocks are convex stages, so a plan is a list of stage starts.
    `members` names each block's compute nodes (empty for generated workloads).
    """

    blocks: tuple[Block, ...]
    values: tuple[ChainValue, ...]
    members: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_graph(cls, graph: Graph) -> BlockChain:
        """One block per compute node. Parameter reads sit with their first reader (as
        `opdag.partition` places them); data inputs are made by block 0."""
        nodes = graph.compute_nodes
        pos = {n.name: i for i, n in enumerate(nodes)}
        consumers = graph.consumers
        specs = graph.param_specs
        at: dict[str, int] = dict(pos)
        for n in graph.nodes:
            if n.op == "param":
                readers = [pos[c] for c in consumers[n.name] if c in pos]
                if readers:
                    at[n.name] = min(readers)
        params = [0] * len(nodes)
        pbytes = [0] * len(nodes)
        counted: set[str] = set()
        for n in graph.nodes:
            if n.name not in at:
                continue
            for p in graph.owned_params(n):
                spec = specs.get(p)
                if spec is None or p in counted or not spec.trainable:
                    continue
                counted.add(p)  # a module called twice owns its parameters once
                params[at[n.name]] += math.prod(spec.shape)
                pbytes[at[n.name]] += spec.nbytes
        blocks = tuple(
            Block(
                fwd_flops=n.costs.fwd_flops if n.costs else 0.0,
                bwd_flops=n.costs.bwd_flops if n.costs else 0.0,
                nodes=1,
                params=params[i],
                param_bytes=pbytes[i],
            )
            for i, n in enumerate(nodes)
        )
        values = []
        for n in graph.nodes:
            if n.meta is None:
                continue
            data = n.op == "input"
            src = 0 if data else at.get(n.name)
            if src is None:
                continue
            dsts = tuple(sorted({pos[c] for c in consumers[n.name] if c in pos} - {src}))
            if dsts:
                values.append(ChainValue(src, dsts, n.meta.nbytes, grad_bytes(n.meta), data))
        return cls(blocks, tuple(values), tuple((n.name,) for n in nodes))

    def merge(self, starts: Sequence[int]) -> BlockChain:
        """The coarser chain whose blocks begin at `starts` (sorted, starting with 0)."""
        starts = list(starts)
        if (
            not starts
            or starts[0] != 0
            or starts != sorted(set(starts))
            or starts[-1] >= len(self.blocks)
        ):
            raise ValueError(f"block starts {starts[:8]} must rise from 0 within the chain")
        ends = [*starts[1:], len(self.blocks)]
        blocks = tuple(_sum_blocks(self.blocks[a:b]) for a, b in zip(starts, ends, strict=True))
        members = (
            tuple(
                tuple(m for ms in self.members[a:b] for m in ms)
                for a, b in zip(starts, ends, strict=True)
            )
            if self.members
            else ()
        )
        return BlockChain(blocks, _regroup(self.values, starts), members)

    def load(self, starts: Sequence[int]) -> PipelineLoad:
        """The pipeline whose stages begin at blocks `starts` (sorted, starting with 0)."""
        starts = list(starts)
        n = len(self.blocks)
        if not starts or starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= n:
            raise ValueError(f"stage starts {starts[:8]} must rise from 0 within the chain")
        pre = self._prefix
        ends = [*starts[1:], n]
        stages = tuple(
            StageLoad(*(pre[b][f] - pre[a][f] for f in range(5)))  # type: ignore[arg-type]
            for a, b in zip(starts, ends, strict=True)
        )
        rows: dict[tuple[int, int], list[int]] = {}
        for v in _regroup(self.values, starts):
            for d in v.dsts:
                row = rows.setdefault((v.src, d), [0, 0, 0])
                if v.data:
                    row[2] += v.nbytes
                else:
                    row[0] += v.nbytes
                    row[1] += v.grad_bytes
        transfers = tuple(Transfer(a, d, *rows[(a, d)]) for a, d in sorted(rows))
        return PipelineLoad(stages, transfers)

    @functools.cached_property
    def _prefix(self) -> list[tuple[float, float, int, int, int]]:
        out = [(0.0, 0.0, 0, 0, 0)]
        for b in self.blocks:
            f, w, n, p, pb = out[-1]
            out.append(
                (f + b.fwd_flops, w + b.bwd_flops, n + b.nodes, p + b.params, pb + b.param_bytes)
            )
        return out

    def crossing(self) -> tuple[list[int], list[int]]:
        """Forward and backward bytes crossing each cut position p (between blocks p-1 and
        p), for p in 0..len(blocks); each value counted once."""
        n = len(self.blocks)
        fwd = [0] * (n + 2)
        bwd = [0] * (n + 2)
        for v in self.values:
            fwd[v.src + 1] += v.nbytes
            fwd[v.dsts[-1] + 1] -= v.nbytes
            bwd[v.src + 1] += v.grad_bytes
            bwd[v.dsts[-1] + 1] -= v.grad_bytes
        out_f, out_b, rf, rb = [], [], 0, 0
        for p in range(n + 1):
            rf += fwd[p]
            rb += bwd[p]
            out_f.append(rf)
            out_b.append(rb)
        return out_f, out_b

    def assignment(self, starts: Sequence[int]) -> dict[str, int]:
        """Node name -> stage for the stages beginning at blocks `starts`."""
        return {
            name: bisect.bisect_right(starts, b) - 1
            for b, names in enumerate(self.members)
            for name in names
        }


def _sum_blocks(blocks: Sequence[Block]) -> Block:
    return Block(
        fwd_flops=sum(b.fwd_flops for b in blocks),
        bwd_flops=sum(b.bwd_flops for b in blocks),
        nodes=sum(b.nodes for b in blocks),
        params=sum(b.params for b in blocks),
        param_bytes=sum(b.param_bytes for b in blocks),
    )


def _regroup(values: Sequence[ChainValue], starts: Sequence[int]) -> tuple[ChainValue, ...]:
    out = []
    for v in values:
        src = bisect.bisect_right(starts, v.src) - 1
        dsts = tuple(sorted({bisect.bisect_right(starts, d) - 1 for d in v.dsts} - {src}))
        if dsts:
            out.append(ChainValue(src, dsts, v.nbytes, v.grad_bytes, v.data))
    return tuple(out)


def load_from_partition(cut: Partition) -> PipelineLoad:
    """The load of a partition built by `opdag.partition.partition`."""
    stages = []
    for stage in cut.stages:
        g = stage.graph
        stages.append(
            StageLoad(
                fwd_flops=g.total("fwd_flops"),
                bwd_flops=g.total("bwd_flops"),
                nodes=len(g.compute_nodes),
                params=g.num_params(),
                param_bytes=sum(p.nbytes for p in g.params if p.trainable),
            )
        )
    rows: dict[tuple[int, int], list[int]] = {}
    for e in cut.edges:
        for d in e.dsts:
            row = rows.setdefault((e.src, d), [0, 0, 0])
            row[0] += e.nbytes
            row[1] += grad_bytes(e.meta)
    for stage in cut.stages:
        for name in stage.data_inputs if stage.index else ():
            meta = cut.graph.node(name).meta
            rows.setdefault((0, stage.index), [0, 0, 0])[2] += meta.nbytes if meta else 0
    transfers = tuple(Transfer(a, d, *rows[(a, d)]) for a, d in sorted(rows))
    return PipelineLoad(tuple(stages), transfers)


# -- the schedule ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def one_f_one_b(stage: int, num_stages: int, micro_batches: int) -> tuple[tuple[bool, int], ...]:
    """Stage `stage`'s 1F1B op list as (is_backward, micro-batch): the rule the workers run
    (warm-up of `num_stages - stage - 1` forwards, then alternate, then drain)."""
    warmup = min(num_stages - stage - 1, micro_batches)
    ops = [(False, m) for m in range(warmup)]
    for m in range(warmup, micro_batches):
        ops.append((False, m))
        ops.append((True, m - warmup))
    ops += [(True, m) for m in range(micro_batches - warmup, micro_batches)]
    return tuple(ops)


# -- the estimate ------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkLoad:
    """One directed worker pair's traffic in one step."""

    src_worker: str
    dst_worker: str
    src_stage: int
    dst_stage: int
    replica: int
    direction: str  # "fwd" (activations and data) or "bwd" (gradients)
    dense_bytes: int
    wire_bytes: int
    busy_s: float
    codec: str = NO_CODEC
    ratio: float = 1.0


@dataclass(frozen=True)
class StepEstimate:
    """The predicted training step: total seconds and where the time goes."""

    total_s: float
    micro_batches: int  # per replica
    replicas: int
    stage_compute_s: tuple[float, ...]  # busy seconds per stage (slowest replica), with step
    allreduce_s: tuple[float, ...]  # per stage; zeros without replicas
    links: tuple[LinkLoad, ...]
    bottleneck: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "micro_batches": self.micro_batches,
            "replicas": self.replicas,
            "stage_compute_s": list(self.stage_compute_s),
            "allreduce_s": list(self.allreduce_s),
            "links": [dict(x.__dict__) for x in self.links],
            "bottleneck": self.bottleneck,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepEstimate:
        return cls(
            total_s=float(d["total_s"]),
            micro_batches=int(d["micro_batches"]),
            replicas=int(d["replicas"]),
            stage_compute_s=tuple(float(x) for x in d["stage_compute_s"]),
            allreduce_s=tuple(float(x) for x in d["allreduce_s"]),
            links=tuple(LinkLoad(**x) for x in d["links"]),
            bottleneck=str(d["bottleneck"]),
        )


class Estimator:
    """Predicts compute, transfer and step times for one set of workers and links."""

    def __init__(
        self,
        speeds: Mapping[str, float],
        links: BandwidthMatrix,
        *,
        compute: ComputeModel | None = None,
        compression: WireCompression | None = None,
    ) -> None:
        self.speeds = dict(speeds)
        self.links = links
        self.compute = compute or ComputeModel()
        self.compression = compression
        self._wire: dict[tuple[int, float, float], tuple[str, float, int]] = {}
        self._steps: dict[tuple[PipelineLoad, tuple[tuple[str, ...], ...], int], StepEstimate] = {}

    def rate(self, worker_id: str) -> float:
        return self.compute.rate(worker_id, self._speed(worker_id))

    def _speed(self, worker_id: str) -> float:
        try:
            return self.speeds[worker_id]
        except KeyError:
            raise KeyError(f"no measured speed for worker {worker_id}") from None

    def stage_seconds(self, stage: StageLoad | Block, worker_id: str) -> tuple[float, float]:
        """Forward and backward seconds per micro-batch of a stage (or block) on a worker."""
        rate, over = self.rate(worker_id), self.compute.node_overhead_s
        return (
            stage.fwd_flops / rate + stage.nodes * over,
            stage.bwd_flops / rate + stage.nodes * over,
        )

    def wire(
        self, dense_bytes: int, bandwidth_Bps: float, budget_s: float
    ) -> tuple[str, float, int]:
        """(codec, ratio, wire bytes) the compression policy picks; none without a policy."""
        if self.compression is None or dense_bytes <= 0 or math.isinf(bandwidth_Bps):
            return NO_CODEC, 1.0, dense_bytes
        key = (dense_bytes, bandwidth_Bps, budget_s)
        got = self._wire.get(key)
        if got is None:
            codec, ratio, wire = self.compression(dense_bytes, bandwidth_Bps, budget_s)
            got = self._wire[key] = (str(codec), float(ratio), int(wire))
        return got

    def transfer_seconds(
        self, dense_bytes: int, src: str, dst: str, *, budget_s: float = math.inf
    ) -> float:
        """Seconds for one message of `dense_bytes` from `src` to `dst`: wire bytes over the
        bandwidth plus half the round trip."""
        if src == dst or dense_bytes <= 0:
            return 0.0
        bw = self.links.bandwidth(src, dst)
        return self.wire(dense_bytes, bw, budget_s)[2] / bw + self.links.latency(src, dst)

    def allreduce_seconds(self, param_bytes: int, workers: Sequence[str]) -> float:
        """A ring all-reduce of `param_bytes` among `workers`: 2(R-1)/R of the bytes over the
        slowest link among them, and 2(R-1) one-way delays."""
        r = len(workers)
        if r < 2 or param_bytes <= 0:
            return 0.0
        pairs = [(a, b) for a in workers for b in workers if a != b]
        bw = min(self.links.bandwidth(a, b) for a, b in pairs)
        lat = max(self.links.latency(a, b) for a, b in pairs)
        return 2 * (r - 1) / r * param_bytes / bw + 2 * (r - 1) * lat

    def step(
        self,
        load: PipelineLoad,
        placement: Sequence[Sequence[str]],
        *,
        micro_batches: int,
    ) -> StepEstimate:
        """The predicted step of `load` with `placement[replica][stage]` = worker id.

        The step's `micro_batches` are dealt out evenly, so each of R replicas runs
        `micro_batches / R` of them.
        """
        plan = tuple(tuple(r) for r in placement)
        key = (load, plan, micro_batches)
        cached = self._steps.get(key)
        if cached is None:
            cached = self._steps[key] = self._step(load, plan, micro_batches)
        return cached

    def _step(
        self, load: PipelineLoad, plan: tuple[tuple[str, ...], ...], micro_batches: int
    ) -> StepEstimate:
        num_stages, replicas = len(load.stages), len(plan)
        if replicas < 1 or any(len(r) != num_stages for r in plan):
            raise ValueError(f"the placement must give each of {num_stages} stages a worker")
        flat = [w for r in plan for w in r]
        if len(set(flat)) != len(flat):
            raise ValueError(f"a worker holds two stages in placement {plan}")
        if micro_batches < 1 or micro_batches % replicas:
            raise ValueError(f"{micro_batches} micro-batches do not split over {replicas} replicas")
        m = micro_batches // replicas

        links: list[LinkLoad] = []
        busy = [0.0] * num_stages
        ends: list[list[float]] = []
        for r, workers in enumerate(plan):
            fb = [self.stage_seconds(st, w) for st, w in zip(load.stages, workers, strict=True)]
            fwd = [x[0] for x in fb]
            bwd = [x[1] for x in fb]
            runs = []
            for t in load.transfers:
                a, d = workers[t.src], workers[t.dst]
                budget = max(fwd[t.src] + bwd[t.src], fwd[t.dst] + bwd[t.dst])
                up, down = self.links.bandwidth(a, d), self.links.bandwidth(d, a)
                c_f, ratio_f, wire_f = self.wire(t.fwd_bytes, up, budget)
                c_b, ratio_b, wire_b = self.wire(t.bwd_bytes, down, budget)
                occ_d = t.data_bytes / up if t.data_bytes > 0 else None
                occ_a = wire_f / up if t.fwd_bytes > 0 else None
                occ_g = wire_b / down if t.bwd_bytes > 0 else None
                lat_f, lat_b = self.links.latency(a, d), self.links.latency(d, a)
                runs.append((t.src, t.dst, occ_d, occ_a, lat_f, occ_g, lat_b))
                if occ_d is not None or occ_a is not None:
                    links.append(
                        LinkLoad(
                            src_worker=a,
                            dst_worker=d,
                            src_stage=t.src,
                            dst_stage=t.dst,
                            replica=r,
                            direction="fwd",
                            dense_bytes=m * (t.fwd_bytes + t.data_bytes),
                            wire_bytes=m * (wire_f + t.data_bytes),
                            busy_s=m * ((occ_a or 0.0) + (occ_d or 0.0)),
                            codec=c_f,
                            ratio=ratio_f,
                        )
                    )
                if occ_g is not None:
                    links.append(
                        LinkLoad(
                            src_worker=d,
                            dst_worker=a,
                            src_stage=t.dst,
                            dst_stage=t.src,
                            replica=r,
                            direction="bwd",
                            dense_bytes=m * t.bwd_bytes,
                            wire_bytes=m * wire_b,
                            busy_s=m * occ_g,
                            codec=c_b,
                            ratio=ratio_b,
                        )
                    )
            ends.append(simulate_1f1b(fwd, bwd, runs, m))
            for s in range(num_stages):
                busy[s] = max(busy[s], m * (fwd[s] + bwd[s]))

        allreduce = tuple(
            self.allreduce_seconds(st.param_bytes, [r[s] for r in plan])
            for s, st in enumerate(load.stages)
        )
        total = 0.0
        compute = []
        for s, st in enumerate(load.stages):
            steps = [self.compute.step_seconds(st.params, r[s], self._speed(r[s])) for r in plan]
            done = max(e[s] for e in ends) + allreduce[s]
            total = max(total, max(done + x for x in steps))
            compute.append(busy[s] + max(steps))
        return StepEstimate(
            total_s=total,
            micro_batches=m,
            replicas=replicas,
            stage_compute_s=tuple(compute),
            allreduce_s=allreduce,
            links=tuple(links),
            bottleneck=_bottleneck(total, compute, allreduce, links, plan),
        )


def _bottleneck(
    total: float,
    compute: Sequence[float],
    allreduce: Sequence[float],
    links: Sequence[LinkLoad],
    plan: tuple[tuple[str, ...], ...],
) -> str:
    """Name the busiest resource of the step, and how much of the step it fills."""
    best, name = -1.0, "nothing"
    for s, secs in enumerate(compute):
        if secs > best:
            best, name = secs, f"stage {s} compute on {plan[0][s]}"
    for s, secs in enumerate(allreduce):
        if secs > best:
            best, name = secs, f"stage {s} gradient all-reduce"
    for x in links:
        if x.busy_s > best:
            best = x.busy_s
            name = (
                f"link {x.src_worker}->{x.dst_worker} "
                f"({x.direction}, stage {x.src_stage}->{x.dst_stage})"
            )
    share = best / total if total > 0 else 0.0
    return f"{name}: {best:.4g} s busy of {total:.4g} s ({share:.0%})"


def simulate_1f1b(
    fwd: Sequence[float],
    bwd: Sequence[float],
    transfers: Sequence[tuple[int, int, float | None, float | None, float, float | None, float]],
    micro_batches: int,
) -> list[float]:
    """Event simulation of one pipeline: when each stage finishes its last backward.

    `fwd[s]`, `bwd[s]`: seconds per micro-batch. Each transfer is `(src, dst, data_occ,
    act_occ, fwd_latency, grad_occ, bwd_latency)`: occupancies in seconds per micro-batch
    (None when nothing is sent). Data leave stage 0 when its forward starts, activations
    when the forward ends, gradients when the backward ends; each link sends in FIFO order
    and a message arrives its latency after it has left the link.

    Times follow from the dependencies alone, so stages are advanced in sweeps (up the
    pipeline for forwards, down for backwards), each as far as its inputs allow.
    """
    n, m = len(fwd), micro_batches
    sched = [one_f_one_b(s, n, m) for s in range(n)]
    # Per stage: arrival lists its forwards and backwards wait for, and what they send:
    # (arrival list to fill, link index, data occupancy, message occupancy, latency).
    links = [0.0] * (2 * len(transfers))
    arr_f = [[-1.0] * m for _ in transfers]
    arr_b = [[-1.0] * m for _ in transfers]
    need_f: list[list[list[float]]] = [[] for _ in range(n)]
    need_b: list[list[list[float]]] = [[] for _ in range(n)]
    send_f: list[list[tuple[list[float], int, float | None, float | None, float]]] = [
        [] for _ in range(n)
    ]
    send_b: list[list[tuple[list[float], int, float | None, float | None, float]]] = [
        [] for _ in range(n)
    ]
    for t, (a, d, occ_d, occ_a, lat_f, occ_g, lat_b) in enumerate(transfers):
        if not a < d:
            raise ValueError(f"transfer {a} -> {d} does not flow forward")
        if occ_d is not None or occ_a is not None:
            need_f[d].append(arr_f[t])
            send_f[a].append((arr_f[t], 2 * t, occ_d, occ_a, lat_f))
        if occ_g is not None:
            need_b[a].append(arr_b[t])
            send_b[d].append((arr_b[t], 2 * t + 1, None, occ_g, lat_b))
    free = [0.0] * n
    ptr = [0] * n
    left = n
    sweep = [*range(n), *range(n - 1, -1, -1)]
    while left:
        moved = False
        for s in sweep:
            ops, k = sched[s], ptr[s]
            if k == len(ops):
                continue
            now = free[s]
            while k < len(ops):
                backward, mb = ops[k]
                start = now
                for arrivals in need_b[s] if backward else need_f[s]:
                    at = arrivals[mb]
                    if at < 0:
                        break
                    if at > start:
                        start = at
                else:
                    now = start + (bwd[s] if backward else fwd[s])
                    for arrivals, li, occ_d, occ, lat in send_b[s] if backward else send_f[s]:
                        out = links[li]
                        if occ_d is not None:  # data leave when the forward starts
                            out = (start if start > out else out) + occ_d
                        if occ is not None:
                            out = (now if now > out else out) + occ
                        links[li] = out
                        arrivals[mb] = out + lat
                    k += 1
                    continue
                break  # an input has not arrived yet
            if k != ptr[s]:
                moved = True
                ptr[s], free[s] = k, now
                if k == len(ops):
                    left -= 1
        if not moved:
            stuck = [s for s in range(n) if ptr[s] < len(sched[s])]
            raise RuntimeError(f"the simulated schedule deadlocked at stages {stuck}")
    return free
