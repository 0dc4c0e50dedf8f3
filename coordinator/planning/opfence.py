"""The OP-Fence planner: islands, pipeline stages and their placement, by predicted step time.

1. Islands (`islands`): single linkage on pairwise bandwidth (the slower direction of
   each pair): two workers join when their link is within `ISLAND_GAP`x of the best link
   either has.
2. Coarsening (`coarsening`): around each ideal cut of the compute nodes' topological
   order into `max_blocks` blocks of equal work, the cut position crossed by the fewest
   bytes (forward and backward) within half a block, so blocks end where little flows,
   e.g. between transformer layers. Contiguous runs of that order are convex stages.
3. Search: for each replica count and slot layout (a slot: a stage's worker per replica,
   the replicas inside one island, or along lanes across islands so that each pipeline
   stays in an island and the averaging crosses), a dynamic programme (`pipeline_dp`)
   builds pipelines backwards from the last block, a stage at a time: its blocks, and its
   slot - any unused one of a small island (in a small cluster), else the island's next
   fastest, or the way into an island not used yet (in any order, for up to `ANY_ORDER`
   islands; along greedy routes beyond). Each state keeps a Pareto front of (bottleneck,
   tail, stages) (`scoring`): the tail sums stage and link seconds per micro-batch from
   the stage to the end, the bottleneck is the slowest stage, link or in-flight bound
   (1F1B lets stage s hold S - s micro-batches, so one takes tail / (S - s) at least),
   and a plan scores about (M - 1) x bottleneck + tail. The best few are simulated with
   the estimator, then improved by local moves (`local_search`: shift a cut, merge or
   split stages, move a stage to an unused worker, swap two stages) judged by the same
   simulation.
4. Refinement (`local_search`): the winner's cuts move within windows of a `REFINE`x
   finer coarsening (a small DP proposes, the simulation decides), to balance better
   than blocks allow.

The plan is plain data (`opfence_plan`): `OpFencePlan.to_dict()` stores it, `explain()`
prints it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.planning.coarsening import MAX_BLOCKS, REFINE, coarse_starts
from coordinator.planning.compute import ComputeModel
from coordinator.planning.estimator import Estimator, StepEstimate, WireCompression
from coordinator.planning.islands import find_islands
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.local_search import improve, refine_cuts
from coordinator.planning.opfence_plan import OpFencePlan, build_plan
from coordinator.planning.pipeline_dp import propose_plans, slot_layouts
from coordinator.planning.plan import WorkerSlot
from coordinator.planning.scoring import SimulatedSteps
from coordinator.planning.sync_spec import SyncSpec
from coordinator.planning.workload import BlockChain
from opdag.ir import Graph
from opdag.partition import balanced_assignment

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
    sync: SyncSpec | None = None,
    warmup: int | None = None,
) -> OpFencePlan:
    """Plan `graph` (costs per micro-batch) on `workers` over measured `links`: the
    stages, their workers and the predicted step, for `micro_batches` per step, replicas
    averaging by `sync` (default: gradients every step)."""
    # A worker whose speed was never probed cannot be balanced against: it sits out.
    speeds = {w.worker_id: w.gflops for w in workers if w.gflops > 0}
    if not speeds:
        raise ValueError("there are no workers with a measured speed to plan on")
    fine = BlockChain.from_graph(graph)
    est = Estimator(
        speeds,
        links,
        compute=compute_model,
        compression=compression,
        sync=sync,
        warmup=warmup,
        memory={w.worker_id: w.memory_bytes for w in workers},
    )
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
        sync=sync,
        warmup=warmup,
        memory={w.worker_id: w.memory_bytes for w in workers},
    )
    finer = fine.merge(fine_starts)
    index = {p: i for i, p in enumerate(fine_starts)}
    refined = refine_cuts(
        SimulatedSteps(finer, est, micro_batches),
        tuple(index[starts[b]] for b in found.starts),
        tuple(zip(*found.placement, strict=True)),
        micro_batches // len(found.placement),
    )
    return build_plan(
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
    sync: SyncSpec | None = None,
    warmup: int | None = None,
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
    est = Estimator(
        speeds,
        links,
        compute=compute_model,
        compression=compression,
        sync=sync,
        warmup=warmup,
        memory={w.worker_id: w.memory_bytes for w in workers},
    )
    islands = find_islands(list(speeds), links)
    return build_plan("even", graph, fine, starts, placement, islands, est, micro_batches)


# -- the search over a chain of blocks ---------------------------------------------------


@dataclass(frozen=True)
class ChainPlan:
    """The search's answer on a chain: where stages start, and their workers."""

    starts: tuple[int, ...]
    placement: tuple[tuple[str, ...], ...]  # [replica][stage] -> worker id
    estimate: StepEstimate
    islands: tuple[tuple[str, ...], ...]
    evaluated: int  # plans simulated in full


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
    sync: SyncSpec | None = None,
    warmup: int | None = None,
    memory: Mapping[str, int] | None = None,
) -> ChainPlan:
    """The fastest predicted pipeline over `chain` on the workers of `speeds` (in their
    order), searching stage counts, cuts, placements and, up to `max_replicas`, replicas
    (averaging by `sync`), each replica count on every slot layout `slot_layouts` offers."""
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
    est = Estimator(
        speeds,
        links,
        compute=compute_model,
        compression=compression,
        sync=sync,
        warmup=warmup,
        memory=memory,
    )
    isl = tuple(tuple(i) for i in islands) if islands else find_islands(ids, links)
    search = SimulatedSteps(chain, est, micro_batches)
    limit = min(len(chain.blocks), max_stages or len(ids))
    best: tuple[float, tuple[int, ...], tuple[tuple[str, ...], ...]] | None = None
    for r in range(1, max_replicas + 1):
        if micro_batches % r or r > len(ids):
            continue
        for groups in slot_layouts(isl, est, r):
            found = _search_slots(search, groups, limit, micro_batches // r)
            if found is not None and (best is None or found[0] < best[0]):
                best = found
    assert best is not None, "one replica always has a plan"
    _, starts, seq = best
    placement = tuple(zip(*seq, strict=True))
    estimate = est.step(search.load(starts), placement, micro_batches=micro_batches)
    return ChainPlan(starts, placement, estimate, isl, search.evaluated)


def _search_slots(
    search: SimulatedSteps,
    groups: Sequence[Sequence[tuple[str, ...]]],
    max_stages: int,
    m: int,
) -> tuple[float, tuple[int, ...], tuple[tuple[str, ...], ...]] | None:
    """The best plan on these slots: DP candidates by score, simulated, then improved
    locally by simulation."""
    found = propose_plans(search.chain, search.est, groups, max_stages, m)
    if not found.heap:
        return None
    scored = sorted((search.score(s, q), s, q) for s, q in found.ranked())
    best = scored[0]
    for _, s, q in scored[:3]:
        improved = improve(search, s, q, groups, max_stages)
        if improved[0] < best[0]:
            best = improved
    return best
