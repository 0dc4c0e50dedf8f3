"""Local search: improving a plan by moves the simulation judges.

`improve` tries plans one move away (shift a cut, merge or split stages, move a stage to
an unused slot, swap two stages) and keeps the first that simulates faster, until none
does or its budget is spent. `refine_cuts` moves a plan's cuts on a finer chain, its
slots kept.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from coordinator.planning.coarsening import REFINE
from coordinator.planning.pipeline_dp import ANY_ORDER, EXACT_ISLAND
from coordinator.planning.scoring import Candidates, ProxyScorer, SimulatedSteps, insert_pareto

LOCAL_EVALS = 400  # simulations the local improvement may spend per candidate,
LOCAL_OPS = 100_000  # and at most this many simulated ops (stages x micro-batches) each


def improve(
    search: SimulatedSteps,
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
        for cand_s, cand_q in neighbours(starts, seq, groups, n, max_stages):
            spent += 1
            value = search.score(cand_s, cand_q)
            if value < best * (1 - 1e-9):
                best, starts, seq, improved = value, cand_s, cand_q, True
                break
            if spent >= budget:
                break
    return best, starts, seq


def neighbours(
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


def refine_cuts(
    search: SimulatedSteps, starts: tuple[int, ...], seq: tuple[tuple[str, ...], ...], m: int
) -> tuple[int, ...]:
    """Re-cut a plan on a finer chain, its workers kept: each cut may move up to
    `REFINE` + 1 finer blocks either way; a DP over those windows (the search's score)
    proposes candidates, the simulation picks the best, the plan as it was included."""
    n, k = len(search.chain.blocks), len(starts)
    if k < 2:
        return starts
    sc = ProxyScorer(search.chain, search.est, list(seq), m)
    reach = REFINE + 1
    windows = [range(max(1, p - reach), min(n, p + reach + 1)) for p in starts[1:]]
    found = Candidates()
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
                        insert_pareto(nxt_fronts.setdefault(p, []), entry, m, False)
        fronts = nxt_fronts
    best = (search.score(starts, seq), starts)
    for cand, _ in found.ranked():
        best = min(best, (search.score(cand, seq), cand))
    return best[1]
