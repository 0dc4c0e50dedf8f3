"""How long OP-Fence takes to plan a 1,000-node gpt on 64 simulated workers in four
islands, and its predicted step time against the `even` plan's, predicted by the same
estimator in the same run.

The workers register in shuffled order (as volunteers join), so `even`'s registration
order interleaves the islands; OP-Fence's plan should keep heavy traffic inside them.
"""

from __future__ import annotations

import random
import statistics
import time

from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.opfence import plan_even_baseline, plan_opfence
from coordinator.planning.plan import WorkerSlot
from opdag.capture import capture
from opdag.ir import Graph
from opdag.zoo import build_model, example_batch

ARGS = {"layers": 42, "d_model": 256, "heads": 8, "context": 128}
MICRO_BATCH = 4
MICRO_BATCHES = 8
TARGET_S = 2.0
MBIT = 1e6 / 8  # bytes per second in one Mbit/s

# (name, workers, GFLOP/s range, bandwidth inside in Mbit/s, round trip inside in s)
ISLANDS = (
    ("gpu-site", 8, (150.0, 300.0), 10_000, 0.0002),
    ("campus", 24, (20.0, 60.0), 1_000, 0.0005),
    ("lab", 16, (30.0, 80.0), 1_000, 0.001),
    ("homes", 16, (10.0, 40.0), 100, 0.01),
)
# Between islands: Mbit/s and round trip, both ways.
BETWEEN = {
    ("gpu-site", "campus"): (200, 0.02),
    ("gpu-site", "lab"): (50, 0.04),
    ("gpu-site", "homes"): (20, 0.06),
    ("campus", "lab"): (100, 0.03),
    ("campus", "homes"): (20, 0.05),
    ("lab", "homes"): (20, 0.05),
}


def cluster(seed: int = 0) -> tuple[list[WorkerSlot], BandwidthMatrix]:
    rng = random.Random(seed)
    workers: list[WorkerSlot] = []
    home: dict[str, str] = {}
    for name, count, (lo, hi), _, _ in ISLANDS:
        for i in range(count):
            wid = f"{name}-{i}"
            workers.append(WorkerSlot(wid, wid, f"10.0.0.{len(workers) + 1}", rng.uniform(lo, hi)))
            home[wid] = name
    rng.shuffle(workers)
    inside = {name: (bw, rtt) for name, _, _, bw, rtt in ISLANDS}
    measured = {}
    for a in workers:
        for b in workers:
            if a is b:
                continue
            ha, hb = home[a.worker_id], home[b.worker_id]
            if ha == hb:
                mbit, rtt = inside[ha]
            else:
                mbit, rtt = BETWEEN.get((ha, hb)) or BETWEEN[(hb, ha)]
            measured[(a.worker_id, b.worker_id)] = (mbit * MBIT * rng.uniform(0.9, 1.1), rtt)
    return workers, BandwidthMatrix.of(measured)


def captured_gpt() -> Graph:
    model = build_model("gpt", ARGS, seed=0)
    return capture(model, example_batch("gpt", ARGS, MICRO_BATCH, device="meta"), name="gpt").graph


def main() -> None:
    began = time.perf_counter()
    graph = captured_gpt()
    capture_s = time.perf_counter() - began
    workers, links = cluster()
    times = []
    for _ in range(3):
        began = time.perf_counter()
        plan = plan_opfence(graph, workers, links, micro_batches=MICRO_BATCHES)
        times.append(time.perf_counter() - began)
    began = time.perf_counter()
    even = plan_even_baseline(graph, workers, links, micro_batches=MICRO_BATCHES)
    even_s = time.perf_counter() - began
    # `even` with as many stages as OP-Fence chose, on the first workers to register.
    even_n = plan_even_baseline(
        graph, workers, links, micro_batches=MICRO_BATCHES, stages=plan.num_stages
    )
    crossing = sum(1 for x in plan.links if x.crosses_islands and x.dst_stage == x.src_stage + 1)
    print(
        f"gpt {ARGS}: {len(graph.nodes)} nodes (captured in {capture_s:.1f} s), "
        f"{len(workers)} workers in {len(plan.islands)} islands, {MICRO_BATCHES} micro-batches"
    )
    print(
        f"  OP-Fence planning time: {times[0]:6.3f} s first, {statistics.median(times):6.3f} s "
        f"median of {len(times)}   (target < {TARGET_S:.0f} s)"
    )
    print(f"  even planning + estimate: {even_s:6.3f} s")
    print(
        f"  OP-Fence: {plan.num_stages:2d} stages ({plan.blocks} blocks searched), "
        f"{crossing} cut(s) across islands, predicted step {plan.step_s:8.3f} s"
    )
    print(
        f"  even:     {even.num_stages:2d} stages (one per worker), "
        f"predicted step {even.step_s:8.3f} s"
    )
    print(
        f"  even:     {even_n.num_stages:2d} stages (OP-Fence's count), "
        f"predicted step {even_n.step_s:8.3f} s"
    )
    print(
        f"  ratio, even / OP-Fence predicted step time: {even.step_s / plan.step_s:6.2f}x "
        f"(one per worker), {even_n.step_s / plan.step_s:6.2f}x (same stage count)"
    )
    print(f"  OP-Fence bottleneck: {plan.estimate.bottleneck}")
