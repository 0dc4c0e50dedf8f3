"""Islands: workers grouped by the bandwidth between them.

OP-Fence's first step. Within an island links are fast, so heavy edges may cross between
its workers; between islands they are slow, so the search keeps cuts there few and light.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.planning.links import BandwidthMatrix

ISLAND_GAP = 4.0  # bandwidth ratio that separates islands


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
