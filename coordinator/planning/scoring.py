"""How the search scores plans: by simulation, and by the DP's fast proxy.

`SimulatedSteps` prices a plan with the estimator (the judge of every final choice);
`ProxyScorer` is the dynamic programme's estimate of the same step, cheap enough for
every partial plan; `insert_pareto` keeps each DP state's front of partial plans and
`Candidates` the best few whole plans, for the simulation to rank.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

from coordinator.planning.estimator import Estimator
from coordinator.planning.workload import BlockChain, PipelineLoad

MARGIN = 1.5  # DP states scoring above MARGIN x the best plan's score are pruned
CANDIDATES = 16  # DP results simulated in full
FRONT = 6  # Pareto entries kept per DP state


class SimulatedSteps:
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


class ProxyScorer:
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


PlanKey = tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]


class Candidates:
    """The best `CANDIDATES` distinct plans by score, and the bound a partial plan must
    beat to join them: the K-th best, or `MARGIN` x the best (the score is a proxy; the
    margin covers its error)."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, PlanKey]] = []
        self.best = math.inf
        self._seen: set[PlanKey] = set()
        self._tie = itertools.count()

    def bound(self) -> float:
        if len(self.heap) < CANDIDATES:
            return MARGIN * self.best
        return min(-self.heap[0][0], MARGIN * self.best)

    def add(self, value: float, key: PlanKey) -> None:
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

    def ranked(self) -> list[PlanKey]:
        return [key for _, _, key in sorted(self.heap, reverse=True)]


def insert_pareto(
    front: list[tuple[Any, ...]], entry: tuple[Any, ...], m: int, fewest: bool
) -> None:
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
