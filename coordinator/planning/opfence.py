"""The OP-Fence planner: islands, pipeline stages and their placement, by predicted step time.

1. Islands: single linkage on pairwise bandwidth (the slower direction of each pair): two
   workers join when their link is within `ISLAND_GAP`x of the best link either has.
2. Coarsening: around each ideal cut of the compute nodes' topological order into
   `max_blocks` blocks of equal work, the cut position crossed by the fewest bytes
   (forward and backward) within half a block, so blocks end where little flows, e.g.
   between transformer layers. Contiguous runs of that order are convex stages.
3. Search: a dynamic programme builds pipelines backwards from the last block, a stage
   at a time: its blocks, and its worker - any unused one of a small island (in a small
   cluster), else the island's next fastest, or the way into an island not used yet (in
   any order, for up to `ANY_ORDER` islands; along greedy routes beyond). Each state
   keeps a Pareto front of (bottleneck, tail, stages): the tail sums stage and link
   seconds per micro-batch from the stage to the end, the bottleneck is the slowest
   stage, link or in-flight bound (1F1B lets stage s hold S - s micro-batches, so one
   takes tail / (S - s) at least), and a plan scores about (M - 1) x bottleneck + tail.
   The best few are simulated with the estimator, then improved by local moves (shift a
   cut, merge or split stages, move a stage to an unused worker, swap two stages) judged
   by the same simulation.
4. Refinement: the winner's cuts move within windows of a `REFINE`x finer coarsening (a
   small DP proposes, the simulation decides), to balance better than blocks allow.

The plan is plain data: `OpFencePlan.to_dict()` stores it, `explain()` prints it.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.planning.compute import ComputeModel
from coordinator.planning.estimator import (
    NO_CODEC,
    Estimator,
    LinkLoad,
    StepEstimate,
    WireCompression,
)
from coordinator.planning.links import BandwidthMatrix, format_rate
from coordinator.planning.plan import WorkerSlot
from coordinator.planning.workload import BlockChain, PipelineLoad
from opdag.ir import Graph
from opdag.partition import balanced_assignment, partition

ISLAND_GAP = 4.0  # bandwidth ratio that separates islands
MAX_BLOCKS = 48  # coarse blocks the search cuts along
REFINE = 3  # the plan found is refined on blocks this many times finer
ANY_ORDER = 6  # up to this many islands, the DP visits them in any order; beyond, routes
MAX_ROUTES = 6  # greedy routes tried when there are more islands
ROUTE_JUMP = 2  # along a route, the pipeline may skip one island at a time
MARGIN = 1.5  # DP states scoring above MARGIN x the best plan's score are pruned
CANDIDATES = 16  # DP results simulated in full
LOCAL_EVALS = 400  # simulations the local improvement may spend per candidate,
FRONT = 6  # Pareto entries kept per DP state
EXACT_ISLAND = 6  # islands up to this size are searched over every order of their slots,
EXACT_WORKERS = 12  # ... when there are at most this many slots in all
LOCAL_OPS = 100_000  # and at most this many simulated ops (stages x micro-batches) each

# -- islands -----------------------------------------------------------------------------


def find_islands(
    worker_ids: Sequence[str], links: BandwidthMatrix, *, gap: float = ISLAND_GAP
) -> tuple[tuple[str, ...], ...]:
    """Workers grouped into islands of high mutual bandwidth.

    A pair's strength is its slower direction. Two workers are linked when their strength
    is within `gap`x of the strongest link either of them has; islands are the connected
    groups of that relation (single linkage). Judging a link against its own endpoints'
    best, not a global threshold, keeps a slow island (homes on 100 Mbit/s) apart from its
    20 Mbit/s neighbours as well as a fast one. Islands and members keep `worker_ids` order.
    """
    ids = list(worker_ids)
    strength = {
        (a, b): min(links.bandwidth(a, b), links.bandwidth(b, a))
        for a in ids
        for b in ids
        if a != b
    }
    best = {a: max((strength[(a, b)] for b in ids if b != a), default=0.0) for a in ids}
    parent = {a: a for a in ids}

    def root(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for (a, b), bw in strength.items():
        if bw * gap >= max(best[a], best[b]):
            parent[root(a)] = root(b)
    groups: dict[str, list[str]] = {}
    for a in ids:
        groups.setdefault(root(a), []).append(a)
    return tuple(tuple(g) for g in groups.values())


# -- coarsening --------------------------------------------------------------------------


def coarse_starts(
    graph: Graph,
    chain: BlockChain,
    *,
    max_blocks: int = MAX_BLOCKS,
    work: Sequence[float],
    among: Sequence[int] | None = None,
) -> list[int]:
    """Where at most `max_blocks` coarse blocks begin in the one-node-per-block `chain` of
    `graph`: around each ideal cut into blocks of equal `work`, within half a block, the
    allowed cut crossed by the fewest bytes (ties: the nearest). A cut between two calls
    of one module is not allowed; `among` restricts the cuts further (to nest two
    coarsenings)."""
    n = len(chain.blocks)
    allowed = [True] * (n + 1)
    allowed[0] = allowed[n] = False
    first: dict[str, int] = {}
    for i, node in enumerate(graph.compute_nodes):
        if node.op == "module":
            j = first.setdefault(node.target, i)
            for p in range(j + 1, i + 1):
                allowed[p] = False  # the module's calls must share a stage
    fwd, bwd = chain.crossing()
    prefix = [0.0]
    for w in work:
        prefix.append(prefix[-1] + w)
    total = prefix[-1]
    if total <= 0:
        prefix = [float(i) for i in range(n + 1)]
        total = float(n)
    positions = [p for p in (range(1, n) if among is None else sorted(among)) if allowed[p]]
    if len(positions) < max_blocks:
        return [0, *positions]
    starts = {0}
    for k in range(1, max_blocks):
        # The window around the k-th of max_blocks - 1 ideal cuts, as wide as a block.
        middle = total * k / max_blocks
        lo, hi = middle - total / max_blocks / 2, middle + total / max_blocks / 2
        a = bisect.bisect_left(positions, bisect.bisect_left(prefix, lo))
        b = bisect.bisect_right(positions, bisect.bisect_right(prefix, hi) - 1)
        window = [p for p in positions[a:b] if lo <= prefix[p] <= hi]
        if window:
            starts.add(min(window, key=lambda p: (fwd[p] + bwd[p], abs(prefix[p] - middle), p)))
    return sorted(starts)


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
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
    stages: tuple[StagePlan, ...]
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
            stages=tuple(StagePlan(**{**s, "workers": tuple(s["workers"])}) for s in d["stages"]),
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
        if any(est.allreduce_s):
            lines.append(
                "gradient all-reduce per stage (s): "
                + ", ".join(f"{x:.3g}" for x in est.allreduce_s)
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


# -- the search over a chain of blocks ---------------------------------------------------


@dataclass(frozen=True)
class ChainPlan:
    """The search's answer on a chain: where stages start, and their workers."""

    starts: tuple[int, ...]
    placement: tuple[tuple[str, ...], ...]  # [replica][stage] -> worker id
    estimate: StepEstimate
    islands: tuple[tuple[str, ...], ...]
    evaluated: int  # plans simulated in full


class _Search:
    """One search's simulations, with the loads of the cuts tried cached."""

    def __init__(self, chain: BlockChain, est: Estimator, micro_batches: int) -> None:
        self.chain, self.est, self.m = chain, est, micro_batches
        self.loads: dict[tuple[int, ...], PipelineLoad] = {}
        self.evaluated = 0

    def load(self, starts: tuple[int, ...]) -> PipelineLoad:
        got = self.loads.get(starts)
        if got is None:
            got = self.loads[starts] = self.chain.load(starts)
        return got

    def score(self, starts: tuple[int, ...], seq: tuple[tuple[str, ...], ...]) -> float:
        """Simulated step seconds of stages `starts` on slots `seq` (a slot: a worker per
        replica)."""
        self.evaluated += 1
        placement = tuple(zip(*seq, strict=True))
        return self.est.step(self.load(starts), placement, micro_batches=self.m).total_s


def plan_chain(
    chain: BlockChain,
    speeds: Mapping[str, float],
    links: BandwidthMatrix,
    *,
    micro_batches: int,
    max_stages: int | None = None,
    max_replicas: int = 1,
    compression: WireCompression | None = None,
    compute_model: ComputeModel | None = None,
    islands: Sequence[Sequence[str]] | None = None,
) -> ChainPlan:
    """The fastest predicted pipeline over `chain` on the workers of `speeds` (in their
    order), searching stage counts, cuts, placements and, up to `max_replicas`, replicas."""
    if not chain.blocks:
        raise ValueError("the chain has no blocks to plan")
    if not speeds:
        raise ValueError("there are no workers to plan on")
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be at least 1, not {micro_batches}")
    if max_stages is not None and max_stages < 1:
        raise ValueError(f"max_stages must be at least 1, not {max_stages}")
    if max_replicas < 1:
        raise ValueError(f"max_replicas must be at least 1, not {max_replicas}")
    ids = list(speeds)
    est = Estimator(speeds, links, compute=compute_model, compression=compression)
    isl = tuple(tuple(i) for i in islands) if islands else find_islands(ids, links)
    search = _Search(chain, est, micro_batches)
    limit = min(len(chain.blocks), max_stages or len(ids))
    best: tuple[float, tuple[int, ...], tuple[tuple[str, ...], ...]] | None = None
    for r in range(1, max_replicas + 1):
        if micro_batches % r or r > len(ids):
            continue
        groups = _slot_islands(isl, est, r)
        if not any(groups):
            continue
        found = _search_slots(search, groups, limit, micro_batches // r)
        if found is not None and (best is None or found[0] < best[0]):
            best = found
    assert best is not None, "one replica always has a plan"
    _, starts, seq = best
    placement = tuple(zip(*seq, strict=True))
    estimate = est.step(search.load(starts), placement, micro_batches=micro_batches)
    return ChainPlan(starts, placement, estimate, isl, search.evaluated)


def _slot_islands(
    islands: Sequence[Sequence[str]], est: Estimator, replicas: int
) -> list[list[tuple[str, ...]]]:
    """Per island, its slots fastest first: single workers, or `replicas` workers of
    similar speed that run one stage's replicas (so their all-reduce stays in the island)."""
    out = []
    for isl in islands:
        ranked = sorted(isl, key=lambda w: -est.rate(w))
        out.append(
            [
                tuple(ranked[i : i + replicas])
                for i in range(0, len(ranked) - replicas + 1, replicas)
            ]
        )
    return [g for g in out if g]


def _routes(groups: Sequence[Sequence[tuple[str, ...]]], est: Estimator) -> list[tuple[int, ...]]:
    """Orders of the islands for the DP: one pass in any order for a few islands; for
    many, greedy routes that step to the best-connected island not yet visited."""
    k = len(groups)
    if k <= ANY_ORDER:
        return [tuple(range(k))]
    links = est.links

    def strength(a: int, b: int) -> float:
        return max(links.bandwidth(x[0], y[0]) for x in groups[a][:4] for y in groups[b][:4])

    # Routes start from the islands with the most compute.
    power = [sum(est.rate(w) for slot in g for w in slot) for g in groups]
    routes = []
    for first in sorted(range(k), key=lambda r: -power[r])[:MAX_ROUTES]:
        route, left = [first], set(range(k)) - {first}
        while left:
            nxt = max(sorted(left), key=lambda b: strength(route[-1], b))
            route.append(nxt)
            left.remove(nxt)
        routes.append(tuple(route))
    return list(dict.fromkeys(routes))


class _Scorer:
    """The DP's view of a chain on slots: seconds per micro-batch of a stage (forward plus
    backward) and of a cut (occupancy of its slower direction, and its round trip), and
    the score of a whole plan, about its simulated step:

    Built from the last stage backwards, the tail sums stage and link seconds from a stage
    to the end. Under 1F1B stage s holds at most S - s micro-batches in flight, so one
    takes at least tail / (S - s): the bottleneck is the largest stage, link or such bound,
    and a plan scores (M - 1) x bottleneck + the whole tail.
    """

    def __init__(
        self, chain: BlockChain, est: Estimator, slots: Sequence[tuple[str, ...]], m: int
    ) -> None:
        self.est, self.m, self.n = est, m, len(chain.blocks)
        self.rate = {s: min(est.rate(w) for w in s) for s in slots}
        self.over2 = 2 * est.compute.node_overhead_s
        self.fb, self.nodes = [0.0], [0]
        for b in chain.blocks:
            self.fb.append(self.fb[-1] + b.fwd_flops + b.bwd_flops)
            self.nodes.append(self.nodes[-1] + b.nodes)
        fastest = 1.0 / max(self.rate.values())
        # A lower bound on the seconds blocks before i add to any plan's tail.
        self.head = [self.fb[i] * fastest + self.over2 * self.nodes[i] for i in range(self.n + 1)]
        self.cross_f, self.cross_b = chain.crossing()
        # The compression policy's budget inside the DP: a stage's share of perfect balance.
        self.budget = self.head[self.n] / max(1, len(slots))
        self._links: dict[tuple[tuple[str, ...], tuple[str, ...], int], tuple[float, float]] = {}

    def stage(self, slot: tuple[str, ...], h: int, i: int) -> float:
        return (self.fb[i] - self.fb[h]) / self.rate[slot] + self.over2 * (
            self.nodes[i] - self.nodes[h]
        )

    def link(self, u: tuple[str, ...], v: tuple[str, ...], i: int) -> tuple[float, float]:
        """Occupancy (the slower direction) and round trip of cut `i` from slot u to v."""
        key = (u, v, i)
        got = self._links.get(key)
        if got is None:
            est, occ, fill = self.est, 0.0, 0.0
            for a, b in zip(u, v, strict=True):
                up, down = est.links.bandwidth(a, b), est.links.bandwidth(b, a)
                x = est.wire(self.cross_f[i], up, self.budget)[2] / up
                y = (
                    est.wire(self.cross_b[i], down, self.budget)[2] / down
                    if self.cross_b[i]
                    else 0.0
                )
                occ = max(occ, x, y)
                fill = max(fill, x + y + est.links.latency(a, b) + est.links.latency(b, a))
            got = self._links[key] = (occ, fill)
        return got

    def score(self, starts: Sequence[int], seq: Sequence[tuple[str, ...]]) -> float:
        ends = [*starts[1:], self.n]
        top = tail = 0.0
        for j in range(len(starts) - 1, -1, -1):
            c = self.stage(seq[j], starts[j], ends[j])
            if j + 1 < len(starts):
                occ, fill = self.link(seq[j], seq[j + 1], ends[j])
                top, tail = max(top, occ), tail + fill
            tail += c
            top = max(top, c, tail / (len(starts) - j))
        return (self.m - 1) * top + tail


Key = tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]


class _Candidates:
    """The best `CANDIDATES` distinct plans by score, and the bound a partial plan must
    beat to join them: the K-th best, or `MARGIN` x the best (the score is a proxy; the
    margin covers its error)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Key]] = []
        self.best = math.inf
        self._seen: set[Key] = set()
        self._tie = itertools.count()

    def bound(self) -> float:
        if len(self.heap) < CANDIDATES:
            return MARGIN * self.best
        return min(-self.heap[0][0], MARGIN * self.best)

    def add(self, value: float, key: Key) -> None:
        self.best = min(self.best, value)
        if key in self._seen:
            return
        self._seen.add(key)
        item = (-value, next(self._tie), key)
        if len(self.heap) < CANDIDATES:
            heapq.heappush(self.heap, item)
        elif value < -self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def add_entry(self, value: float, entry: tuple[Any, ...] | None) -> None:
        """Add the plan a DP entry ends (entries link a stage to the next one)."""
        starts, seq = [], []
        while entry is not None:
            starts.append(entry[4])
            seq.append(entry[3])
            entry = entry[5]
        self.add(value, (tuple(starts), tuple(seq)))

    def ranked(self) -> list[Key]:
        return [key for _, _, key in sorted(self.heap, reverse=True)]


def _search_slots(
    search: _Search,
    groups: Sequence[Sequence[tuple[str, ...]]],
    max_stages: int,
    m: int,
) -> tuple[float, tuple[int, ...], tuple[tuple[str, ...], ...]] | None:
    """The best plan on these slots: DP candidates by score, simulated, then improved
    locally by simulation.

    The DP builds pipelines from the last stage backwards; a state is (first block, slot
    position, used slots of its island) and keeps a Pareto front of (bottleneck, tail,
    stages) - see `_Scorer` and `_insert`.
    """
    est, n = search.est, len(search.chain.blocks)
    slots = [s for g in groups for s in g]
    sc = _Scorer(search.chain, est, slots, m)
    fb, nodes, over2, head = sc.fb, sc.nodes, sc.over2, sc.head
    found = _Candidates()

    # Seeds: each island alone, its fastest k slots sharing the blocks by speed.
    for g in groups:
        for k in range(1, min(len(g), n, max_stages) + 1):
            seq = tuple(g[:k])
            starts = tuple(_balanced_starts(fb, [sc.rate[x] for x in seq]))
            if len(starts) == k:
                found.add(sc.score(starts, seq), (starts, seq))

    # Without a stage limit, more stages in a tail never hurt its in-flight bound.
    fewest = max_stages >= min(n, len(slots))
    for route in _routes(groups, est):
        back = route[::-1]  # the DP walks the pipeline from its end
        order = [s for g in back for s in groups[g]]
        moves = _Moves(
            [len(groups[g]) for g in back],
            any_order=len(route) <= ANY_ORDER,
            exact=len(slots) <= EXACT_WORKERS,
        )
        # entry: (bottleneck, tail, stages, slot, first block, next stage's entry, islands
        # used, score)
        fronts: list[dict[tuple[int, int], list[tuple[Any, ...]]]] = [{} for _ in range(n + 1)]
        todo: list[tuple[int, int, int, tuple[Any, ...] | None]] = [
            (p, mask, used, None) for p, mask, used in moves.after(-1, 0, 0)
        ]
        for i in range(n, 0, -1):
            if i < n:
                todo = [
                    (p2, mask2, used2, e)
                    for (p, mask), front in fronts[i].items()
                    for e in front
                    for p2, mask2, used2 in moves.after(p, mask, e[6])
                ]
            for p2, mask2, used2, nxt in todo:
                slot = order[p2]
                if nxt is None:
                    mx = tail = 0.0
                    k = 0
                else:
                    mx, tail, k = nxt[0], nxt[1], nxt[2]
                    if k >= max_stages:
                        continue
                    occ, fill = sc.link(slot, nxt[3], i)
                    mx = occ if occ > mx else mx
                    tail += fill
                inv = 1.0 / sc.rate[slot]
                limit = found.bound()
                k1 = k + 1
                key = (p2, mask2)
                for h in range(i - 1, -1, -1):
                    c = (fb[i] - fb[h]) * inv + over2 * (nodes[i] - nodes[h])
                    t2 = tail + c
                    top = t2 / k1
                    if c > top:
                        top = c
                    if mx > top:
                        top = mx
                    value = (m - 1) * top + t2
                    if value + head[h] >= limit:
                        break
                    entry = (top, t2, k1, slot, h, nxt, used2, value)
                    if h == 0:
                        found.add_entry(value, entry)
                        limit = found.bound()
                        continue
                    front = fronts[h].get(key)
                    if front is None:
                        fronts[h][key] = [entry]
                    else:
                        _insert(front, entry, m, fewest)
    if not found.heap:
        return None
    scored = sorted((search.score(s, q), s, q) for s, q in found.ranked())
    best = scored[0]
    for _, s, q in scored[:3]:
        improved = _improve(search, s, q, groups, max_stages)
        if improved[0] < best[0]:
            best = improved
    return best


def _balanced_starts(prefix: Sequence[float], rates: Sequence[float]) -> list[int]:
    """Stage starts giving each slot a share of the work `prefix` (cumulative per block)
    proportional to its rate; fewer stages when the blocks are too coarse."""
    n, total = len(prefix) - 1, prefix[-1]
    starts, acc = [0], 0.0
    for r in rates[:-1]:
        acc += r
        p = bisect.bisect_left(prefix, total * acc / sum(rates))
        if (
            0 < p < n
            and p - 1 > starts[-1]
            and abs(prefix[p - 1] - total * acc / sum(rates))
            < abs(prefix[p] - total * acc / sum(rates))
        ):
            p -= 1
        if starts[-1] < p < n:
            starts.append(p)
    return starts


class _Moves:
    """Which slot a pipeline may use next, for a DP over islands' slots (each island's
    slots fastest first, concatenated). With `exact`, a small island is searched exactly:
    any unused slot of it may come next (the state carries a mask of its used slots);
    otherwise an island offers only its next-fastest slot. Then another island, entered by
    any of its slots (exact) or its fastest: with `any_order`, any island not used yet
    (the state carries the set used); else one of the next `ROUTE_JUMP` along the
    concatenation (a route)."""

    def __init__(self, sizes: Sequence[int], *, any_order: bool, exact: bool) -> None:
        self.first: list[int] = []
        self.island: list[int] = []
        at = 0
        for r, size in enumerate(sizes):
            self.first.append(at)
            self.island += [r] * size
            at += size
        self.sizes = list(sizes)
        self.any_order = any_order
        self.exact = [exact and size <= EXACT_ISLAND for size in sizes]
        self._memo: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}

    def after(self, p: int, mask: int, used: int) -> list[tuple[int, int, int]]:
        """(next position, its island's mask, islands used) after position `p` (-1: the
        start)."""
        key = (p, mask, used)
        got = self._memo.get(key)
        if got is not None:
            return got
        out: list[tuple[int, int, int]] = []
        r = self.island[p] if p >= 0 else -1
        if r >= 0:
            start, size = self.first[r], self.sizes[r]
            if self.exact[r]:
                out += [(start + q, mask | 1 << q, used) for q in range(size) if not mask >> q & 1]
            elif p + 1 < start + size:
                out.append((p + 1, 0, used))
        if self.any_order:
            later = range(len(self.sizes))
        elif r < 0:
            later = range(len(self.sizes))  # a route's pipeline may start anywhere on it
        else:
            later = range(r + 1, min(len(self.sizes), r + 1 + ROUTE_JUMP))
        for r2 in later:
            if used >> r2 & 1 or r2 == r:
                continue
            start, size = self.first[r2], self.sizes[r2]
            now = used | 1 << r2 if self.any_order else 0
            if self.exact[r2]:
                out += [(start + q, 1 << q, now) for q in range(size)]
            else:
                out.append((start, 0, now))
        self._memo[key] = out
        return out


def _insert(front: list[tuple[Any, ...]], entry: tuple[Any, ...], m: int, fewest: bool) -> None:
    """Add `entry` to a Pareto front unless dominated: by an entry no worse in bottleneck
    and tail, with no fewer stages (they share the tail's in-flight bound; with a stage
    limit, the same number) and no more islands used (fewer leave more options). A full
    front keeps its `FRONT` best scores."""
    mx, tail, k, used, value = entry[0], entry[1], entry[2], entry[6], entry[7]
    if len(front) >= FRONT and value >= max(e[7] for e in front):
        return
    beats = False
    for e in front:
        if (
            e[0] <= mx
            and e[1] <= tail
            and (e[2] >= k if fewest else e[2] == k)
            and e[6] | used == used
        ):
            return
        if (
            mx <= e[0]
            and tail <= e[1]
            and (k >= e[2] if fewest else k == e[2])
            and used | e[6] == e[6]
        ):
            beats = True
    if beats:
        front[:] = [
            e
            for e in front
            if not (
                mx <= e[0]
                and tail <= e[1]
                and (k >= e[2] if fewest else k == e[2])
                and used | e[6] == e[6]
            )
        ]
    front.append(entry)
    if len(front) > FRONT:
        front.remove(max(front, key=_score_of))


def _score_of(entry: tuple[Any, ...]) -> float:
    return float(entry[7])


def _improve(
    search: _Search,
    starts: tuple[int, ...],
    seq: tuple[tuple[str, ...], ...],
    groups: Sequence[Sequence[tuple[str, ...]]],
    max_stages: int,
) -> tuple[float, tuple[int, ...], tuple[tuple[str, ...], ...]]:
    """First-improvement local search on the simulated step time, within a budget of
    simulations that shrinks as each gets longer."""
    n = len(search.chain.blocks)
    best = search.score(starts, seq)
    ops = len(starts) * search.m
    budget = max(20, min(LOCAL_EVALS, LOCAL_OPS // ops))
    spent = 0
    improved = True
    while improved and spent < budget:
        improved = False
        for cand_s, cand_q in _neighbours(starts, seq, groups, n, max_stages):
            spent += 1
            value = search.score(cand_s, cand_q)
            if value < best * (1 - 1e-9):
                best, starts, seq, improved = value, cand_s, cand_q, True
                break
            if spent >= budget:
                break
    return best, starts, seq


def _neighbours(
    starts: tuple[int, ...],
    seq: tuple[tuple[str, ...], ...],
    groups: Sequence[Sequence[tuple[str, ...]]],
    n: int,
    max_stages: int,
) -> Iterator[tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]]:
    """Plans one move away: shift a cut, merge two stages, move a stage to an unused slot,
    swap two stages' slots, split a stage onto an unused slot. Unused slots are tried all
    in a small island; in a large one (alike by construction), its two fastest."""
    k = len(starts)
    bounds = [*starts, n]
    for j in range(1, k):
        for d in (-1, 1, -2, 2):
            p = starts[j] + d
            if bounds[j - 1] < p < bounds[j + 1]:
                yield (*starts[:j], p, *starts[j + 1 :]), seq
    for j in range(1, k):
        merged = starts[:j] + starts[j + 1 :]
        yield merged, seq[:j] + seq[j + 1 :]
        yield merged, seq[: j - 1] + seq[j:]
    used = set(seq)
    free = []
    for g in groups:
        unused = [s for s in g if s not in used]
        free += unused if len(g) <= EXACT_ISLAND and len(groups) <= ANY_ORDER else unused[:2]
    for j in range(k):
        for s in free:
            yield starts, (*seq[:j], s, *seq[j + 1 :])
    for a, b in itertools.combinations(range(k), 2):
        if k <= 12 or b - a <= 2:
            swapped = list(seq)
            swapped[a], swapped[b] = swapped[b], swapped[a]
            yield starts, tuple(swapped)
    if k < max_stages:
        for j in range(k):
            lo, hi = bounds[j], bounds[j + 1]
            if hi - lo < 2:
                continue
            mid = (lo + hi) // 2
            for s in free:
                yield (
                    (*starts[: j + 1], mid, *starts[j + 1 :]),
                    (*seq[: j + 1], s, *seq[j + 1 :]),
                )


def _refine_cuts(
    search: _Search, starts: tuple[int, ...], seq: tuple[tuple[str, ...], ...], m: int
) -> tuple[int, ...]:
    """Re-cut a plan on a finer chain, its workers kept: each cut may move up to
    `REFINE` + 1 finer blocks either way; a DP over those windows (the search's score)
    proposes candidates, the simulation picks the best, the plan as it was included."""
    n, k = len(search.chain.blocks), len(starts)
    if k < 2:
        return starts
    sc = _Scorer(search.chain, search.est, list(seq), m)
    reach = REFINE + 1
    windows = [range(max(1, p - reach), min(n, p + reach + 1)) for p in starts[1:]]
    found = _Candidates()
    # fronts[q]: partial plans whose stage j starts at block q, as (top, tail, next entry).
    fronts: dict[int, list[tuple[Any, ...]]] = {}
    for q in windows[-1]:
        c = sc.stage(seq[-1], q, n)
        fronts[q] = [(c, c, 1, seq[-1], q, None, 0, (m - 1) * c + c)]
    for j in range(k - 2, -1, -1):
        here = windows[j - 1] if j else range(0, 1)
        nxt_fronts: dict[int, list[tuple[Any, ...]]] = {}
        for p in here:
            for q, front in fronts.items():
                if q <= p:
                    continue
                c = sc.stage(seq[j], p, q)
                occ, fill = sc.link(seq[j], seq[j + 1], q)
                for e in front:
                    tail = e[1] + fill + c
                    top = max(e[0], occ, c, tail / (e[2] + 1))
                    value = (m - 1) * top + tail
                    entry = (top, tail, e[2] + 1, seq[j], p, e, 0, value)
                    if j == 0:
                        found.add_entry(value, entry)
                    else:
                        _insert(nxt_fronts.setdefault(p, []), entry, m, False)
        fronts = nxt_fronts
    best = (search.score(starts, seq), starts)
    for cand, _ in found.ranked():
        best = min(best, (search.score(cand, seq), cand))
    return best[1]


# -- from a graph ------------------------------------------------------------------------


def plan_opfence(
    graph: Graph,
    workers: Sequence[WorkerSlot],
    links: BandwidthMatrix,
    *,
    micro_batches: int,
    max_stages: int | None = None,
    max_replicas: int = 1,
    compression: WireCompression | None = None,
    compute_model: ComputeModel | None = None,
    max_blocks: int = MAX_BLOCKS,
) -> OpFencePlan:
    """Plan `graph` (costs per micro-batch) on `workers` over measured `links`: the
    stages, their workers and the predicted step, for `micro_batches` per step."""
    # A worker whose speed was never probed cannot be balanced against: it sits out.
    speeds = {w.worker_id: w.gflops for w in workers if w.gflops > 0}
    if not speeds:
        raise ValueError("there are no workers with a measured speed to plan on")
    fine = BlockChain.from_graph(graph)
    est = Estimator(speeds, links, compute=compute_model, compression=compression)
    ref = sorted(est.rate(w) for w in speeds)[len(speeds) // 2]
    over2 = 2 * est.compute.node_overhead_s
    work = [(b.fwd_flops + b.bwd_flops) / ref + over2 * b.nodes for b in fine.blocks]
    # The search cuts along coarse blocks; the plan it finds is then refined on blocks
    # REFINE times finer, whose cuts include the coarse ones.
    fine_starts = coarse_starts(graph, fine, max_blocks=REFINE * max_blocks, work=work)
    starts = coarse_starts(graph, fine, max_blocks=max_blocks, work=work, among=fine_starts)
    chain = fine.merge(starts)
    found = plan_chain(
        chain,
        speeds,
        links,
        micro_batches=micro_batches,
        max_stages=max_stages,
        max_replicas=max_replicas,
        compression=compression,
        compute_model=compute_model,
    )
    finer = fine.merge(fine_starts)
    index = {p: i for i, p in enumerate(fine_starts)}
    refined = _refine_cuts(
        _Search(finer, est, micro_batches),
        tuple(index[starts[b]] for b in found.starts),
        tuple(zip(*found.placement, strict=True)),
        micro_batches // len(found.placement),
    )
    return _build_plan(
        "opfence",
        graph,
        finer,
        refined,
        found.placement,
        found.islands,
        est,
        micro_batches,
        blocks=len(chain.blocks),
    )


def plan_even_baseline(
    graph: Graph,
    workers: Sequence[WorkerSlot],
    links: BandwidthMatrix,
    *,
    micro_batches: int,
    stages: int | None = None,
    compression: WireCompression | None = None,
    compute_model: ComputeModel | None = None,
) -> OpFencePlan:
    """Today's `even` plan in OP-Fence's terms, with its predicted step: FLOPs-balanced
    stages (as many as workers, by default) on the workers in registration order."""
    n = min(len(workers), len(graph.compute_nodes)) if stages is None else stages
    if not 1 <= n <= len(workers):
        raise ValueError(f"cannot place {n} stages on {len(workers)} workers")
    speeds = {w.worker_id: w.gflops for w in workers}
    fine = BlockChain.from_graph(graph)
    assignment = balanced_assignment(graph, n)
    order = [assignment[node.name] for node in graph.compute_nodes]
    starts = tuple([0, *(i for i in range(1, len(order)) if order[i] != order[i - 1])])
    placement = (tuple(w.worker_id for w in workers[:n]),)
    est = Estimator(speeds, links, compute=compute_model, compression=compression)
    islands = find_islands(list(speeds), links)
    return _build_plan("even", graph, fine, starts, placement, islands, est, micro_batches)


def _build_plan(
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
    starts = tuple(starts)
    load = chain.load(starts)
    estimate = est.step(load, placement, micro_batches=micro_batches)
    coarse = chain.merge(starts)
    stages = []
    for s, st in enumerate(load.stages):
        f, b = est.stage_seconds(st, placement[0][s])
        members = coarse.members[s] if coarse.members else ()
        stages.append(
            StagePlan(
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
