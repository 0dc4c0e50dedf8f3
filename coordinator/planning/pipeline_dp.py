"""The dynamic programme that proposes plans: stage cuts and the slots that run them.

Pipelines are built backwards from the last block, a stage at a time: its blocks, and its
slot (a worker per replica, `slot_layouts`: a stage's replicas in one island, or spread
along lanes across islands) - any unused one of a small island (in a small cluster), else
the island's next fastest, or the way into an island not used yet (in any order, for up
to `ANY_ORDER` islands; along greedy routes beyond). Each state keeps a Pareto front of
partial plans by the proxy score (`scoring`); the best whole plans are the candidates
the simulation then ranks.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from coordinator.planning.estimator import Estimator
from coordinator.planning.scoring import Candidates, ProxyScorer, insert_pareto
from coordinator.planning.workload import BlockChain

ANY_ORDER = 6  # up to this many islands, the DP visits them in any order; beyond, routes
MAX_ROUTES = 6  # greedy routes tried when there are more islands
ROUTE_JUMP = 2  # along a route, the pipeline may skip one island at a time
EXACT_ISLAND = 6  # islands up to this size are searched over every order of their slots,
EXACT_WORKERS = 12  # ... when there are at most this many slots in all


def slot_islands(
    islands: Sequence[Sequence[str]], est: Estimator, replicas: int
) -> list[list[tuple[str, ...]]]:
    """Per island, its slots fastest first: single workers, or `replicas` workers of
    similar speed that run one stage's replicas (so their averaging stays in the island)."""
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


def replica_lanes(
    islands: Sequence[Sequence[str]], est: Estimator, replicas: int
) -> list[list[tuple[str, ...]]]:
    """Slots whose replicas lie along lanes: the workers island by island (largest and
    fastest islands first, each fastest first), cut into `replicas` equal lanes, replica
    j's pipeline on lane j. Pipelines then stay inside an island where one holds a lane,
    and a stage's sync group spans islands: the layout for local SGD, which sends little
    between replicas. One group (the DP's island) of slots, empty when too few workers."""
    ranked = sorted(
        (sorted(isl, key=lambda w: -est.rate(w)) for isl in islands),
        key=lambda isl: (-len(isl), -sum(est.rate(w) for w in isl)),
    )
    flat = [w for isl in ranked for w in isl]
    size = len(flat) // replicas
    if replicas < 2 or size < 1:
        return []
    lanes = [flat[j * size : (j + 1) * size] for j in range(replicas)]
    return [[tuple(lane[i] for lane in lanes) for i in range(size)]]


def slot_layouts(
    islands: Sequence[Sequence[str]], est: Estimator, replicas: int
) -> list[list[list[tuple[str, ...]]]]:
    """The slot layouts the search tries for `replicas`, each searched on its own (their
    slots share workers): a stage's replicas inside one island (`slot_islands`), and,
    with replicas, along lanes across islands (`replica_lanes`)."""
    layouts = [slot_islands(islands, est, replicas), replica_lanes(islands, est, replicas)]
    out: list[list[list[tuple[str, ...]]]] = []
    for groups in layouts:
        if any(groups) and groups not in out:
            out.append(groups)
    return out


def island_routes(
    groups: Sequence[Sequence[tuple[str, ...]]], est: Estimator
) -> list[tuple[int, ...]]:
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


def propose_plans(
    chain: BlockChain,
    est: Estimator,
    groups: Sequence[Sequence[tuple[str, ...]]],
    max_stages: int,
    m: int,
) -> Candidates:
    """The best plans on these slots by the proxy score, `m` micro-batches per replica.

    The DP builds pipelines from the last stage backwards; a state is (first block, slot
    position, used slots of its island) and keeps a Pareto front of (bottleneck, tail,
    stages) - see `ProxyScorer` and `insert_pareto`.
    """
    n = len(chain.blocks)
    slots = [s for g in groups for s in g]
    sc = ProxyScorer(chain, est, slots, m)
    fb, nodes, over2, head = sc.fb, sc.nodes, sc.over2, sc.head
    found = Candidates()

    # Seeds: each island alone, its fastest k slots sharing the blocks by speed.
    for g in groups:
        for k in range(1, min(len(g), n, max_stages) + 1):
            seq = tuple(g[:k])
            starts = tuple(balanced_starts(fb, [sc.rate[x] for x in seq]))
            if len(starts) == k:
                found.add(sc.score(starts, seq), (starts, seq))

    # Without a stage limit, more stages in a tail never hurt its in-flight bound.
    fewest = max_stages >= min(n, len(slots))
    for route in island_routes(groups, est):
        back = route[::-1]  # the DP walks the pipeline from its end
        order = [s for g in back for s in groups[g]]
        moves = SlotMoves(
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
                        insert_pareto(front, entry, m, fewest)
    return found


def balanced_starts(prefix: Sequence[float], rates: Sequence[float]) -> list[int]:
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


class SlotMoves:
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
