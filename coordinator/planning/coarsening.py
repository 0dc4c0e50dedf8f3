"""Coarsening: where the blocks the search cuts along begin.

The compute nodes' topological order is cut into at most `max_blocks` blocks of about
equal work, each cut moved (within half a block) to where the fewest bytes cross, e.g.
between transformer layers. Contiguous runs of blocks are convex stages, so the search
only chooses stage starts among the blocks.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from coordinator.planning.workload import BlockChain
from opdag.ir import Graph

MAX_BLOCKS = 48  # coarse blocks the search cuts along
REFINE = 3  # the plan found is refined on blocks this many times finer


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
    allowed cut crossed by the fewest bytes (ties: the nearest); `among` restricts the cuts
    further (to nest two coarsenings)."""
    n = len(chain.blocks)
    allowed = [True] * (n + 1)
    allowed[0] = allowed[n] = False
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
