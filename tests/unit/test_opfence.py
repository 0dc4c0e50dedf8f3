"""The OP-Fence planner: islands, coarsening, valid plans, near-optimal search (against an
exhaustive one), a two-region gpt against the `even` plan, and the plan as data."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from coordinator.planning.coarsening import coarse_starts
from coordinator.planning.compute import ComputeModel
from coordinator.planning.estimator import Estimator
from coordinator.planning.islands import find_islands
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.opfence import plan_chain, plan_even_baseline, plan_opfence
from coordinator.planning.opfence_plan import OpFencePlan
from coordinator.planning.plan import WorkerSlot, plan_even
from coordinator.planning.workload import Block, BlockChain, ChainValue
from opdag.capture import capture
from opdag.ir import Graph
from opdag.partition import partition
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

MBIT = 1e6 / 8
GPT = {"layers": 4, "d_model": 128, "heads": 4, "context": 64}


@pytest.fixture(scope="module")
def gpt_graph() -> Graph:
    model = build_model("gpt", GPT, seed=0)
    return capture(model, example_batch("gpt", GPT, 4, device="meta"), name="gpt").graph


def _regions(
    hosts: dict[str, str], *, inside: float, between: float, rtt_between: float = 0.04
) -> BandwidthMatrix:
    """Every pair at `inside` bytes/s within a region, `between` across."""
    return BandwidthMatrix.of(
        {
            (a, b): (inside, 0.001) if hosts[a] == hosts[b] else (between, rtt_between)
            for a in hosts
            for b in hosts
            if a != b
        }
    )


def _slots(speeds: dict[str, float]) -> list[WorkerSlot]:
    return [WorkerSlot(w, w, f"10.0.0.{i + 1}", g) for i, (w, g) in enumerate(speeds.items())]


# -- islands -----------------------------------------------------------------------------


def test_islands_group_interleaved_workers_by_region() -> None:
    hosts = {"a1": "A", "b1": "B", "a2": "A", "b2": "B", "a3": "A"}
    links = _regions(hosts, inside=1000 * MBIT, between=20 * MBIT)
    assert find_islands(list(hosts), links) == (("a1", "a2", "a3"), ("b1", "b2"))


def test_a_slow_island_stays_apart_from_its_slower_neighbours() -> None:
    # Homes share 100 Mbit/s, reach the site at 20; the site is 10 Gbit/s inside. A global
    # threshold would either merge the homes with the site or split the homes up.
    hosts = {"s1": "site", "s2": "site", "h1": "homes", "h2": "homes", "h3": "homes"}
    speeds = {"site": 10_000 * MBIT, "homes": 100 * MBIT}
    links = BandwidthMatrix.of(
        {
            (a, b): (speeds[hosts[a]], 0.001) if hosts[a] == hosts[b] else (20 * MBIT, 0.03)
            for a in hosts
            for b in hosts
            if a != b
        }
    )
    assert find_islands(list(hosts), links) == (("s1", "s2"), ("h1", "h2", "h3"))


def test_workers_of_alike_bandwidth_form_one_island() -> None:
    rng = random.Random(1)
    ids = [f"w{i}" for i in range(6)]
    links = BandwidthMatrix.of(
        {(a, b): (rng.uniform(80, 120) * MBIT, 0.01) for a in ids for b in ids if a != b}
    )
    assert find_islands(ids, links) == (tuple(ids),)


# -- coarsening and validity -------------------------------------------------------------


def test_coarse_blocks_end_where_the_fewest_bytes_cross(gpt_graph: Graph) -> None:
    fine = BlockChain.from_graph(gpt_graph)
    work = [b.fwd_flops + b.bwd_flops for b in fine.blocks]
    starts = coarse_starts(gpt_graph, fine, max_blocks=GPT["layers"], work=work)
    fwd, bwd = fine.crossing()
    cheapest = min(fwd[p] + bwd[p] for p in range(1, len(fine.blocks)))
    assert len(starts) == GPT["layers"]
    # Each cut is crossed by the residual stream alone (and the small data inputs).
    assert all(fwd[p] + bwd[p] == cheapest for p in starts[1:])
    d = GPT["d_model"]
    assert cheapest < 2 * (2 * 4 * GPT["context"] * d * 4)  # one [4, T, d] tensor each way


@pytest.mark.parametrize(
    "speeds",
    [
        {"a1": 10.0},
        {"a1": 10.0, "b1": 10.0, "a2": 10.0, "b2": 10.0},
        {"a1": 5.0, "b1": 40.0, "a2": 20.0, "b2": 1.0},
    ],
)
def test_every_plan_is_a_valid_partition_numbered_along_the_data_flow(
    gpt_graph: Graph, speeds: dict[str, float]
) -> None:
    hosts = {w: w[0] for w in speeds}
    links = _regions(hosts, inside=1000 * MBIT, between=20 * MBIT)
    for planner in (plan_opfence, plan_even_baseline):
        plan = planner(gpt_graph, _slots(speeds), links, micro_batches=4)
        cut = partition(gpt_graph, plan.assignment)  # raises unless convex and ordered
        assert len(cut.stages) == plan.num_stages == len(plan.stage_workers)
        order = [plan.assignment[n.name] for n in gpt_graph.compute_nodes]
        assert order == sorted(order) and order[0] == 0


def test_even_baseline_is_todays_even_plan(gpt_graph: Graph) -> None:
    speeds = {"w1": 10.0, "w2": 30.0, "w3": 20.0}
    workers = _slots(speeds)
    links = BandwidthMatrix.uniform(list(speeds), 100 * MBIT, 0.01)
    even = plan_even_baseline(gpt_graph, workers, links, micro_batches=4)
    today, _ = plan_even(gpt_graph, workers, job_id="j", epoch=1, stages=3, start_step=0)
    assert even.planner == "even"
    assert dict(even.assignment) == dict(today.assignment)
    assert even.stage_workers == today.worker_ids


# -- choices the planner should make -----------------------------------------------------


def test_faster_workers_get_proportionally_more_work(gpt_graph: Graph) -> None:
    speeds = {"slow": 10.0, "fast": 30.0}
    links = BandwidthMatrix.uniform(list(speeds), 10_000 * MBIT, 0.0001)
    plan = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=16, max_stages=2)
    assert plan.num_stages == 2
    flops = {s.workers[0]: s.fwd_flops + s.bwd_flops for s in plan.stages}
    assert 2.0 < flops["fast"] / flops["slow"] < 4.5


def test_it_uses_fewer_workers_rather_than_cross_a_very_slow_link(gpt_graph: Graph) -> None:
    speeds = {"a1": 10.0, "b1": 10.0, "a2": 10.0, "b2": 10.0}
    hosts = {w: w[0] for w in speeds}
    links = _regions(hosts, inside=1000 * MBIT, between=1 * MBIT, rtt_between=0.1)
    plan = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=8)
    assert len({hosts[w] for w in plan.stage_workers}) == 1
    assert plan.num_stages < len(speeds)


def test_max_stages_is_respected(gpt_graph: Graph) -> None:
    speeds = {f"w{i}": 10.0 for i in range(6)}
    links = BandwidthMatrix.uniform(list(speeds), 10_000 * MBIT, 0.0001)
    for limit in (1, 2, 3):
        plan = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=8, max_stages=limit)
        assert plan.num_stages <= limit


def test_one_pipeline_by_default_and_replicas_when_allowed_and_faster(gpt_graph: Graph) -> None:
    speeds = {"a": 10.0, "b": 10.0}
    links = BandwidthMatrix.uniform(list(speeds), 10_000 * MBIT, 0.0001)
    single = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=8)
    assert single.replicas == 1
    both = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=8, max_replicas=2)
    # Two replicas of the whole model skip the pipeline's bubble; their all-reduce of
    # 3.5 MB at 10 Gbit/s costs little.
    assert both.replicas == 2 and both.num_stages == 1
    assert both.step_s < single.step_s
    assert both.estimate.averaging_s[0] > 0
    assert {w for r in both.placement for w in r} == {"a", "b"}


def test_a_compression_policy_shows_on_the_slow_links_it_chose(gpt_graph: Graph) -> None:
    speeds = {"a1": 10.0, "b1": 10.0, "a2": 10.0, "b2": 10.0}
    hosts = {w: w[0] for w in speeds}
    links = _regions(hosts, inside=1000 * MBIT, between=20 * MBIT)

    def topk_on_slow_links(dense: int, bandwidth: float, budget: float) -> tuple[str, float, int]:
        if bandwidth < 100 * MBIT:
            return "topk", 10.0, dense // 10
        return "none", 1.0, dense

    dense = plan_opfence(gpt_graph, _slots(speeds), links, micro_batches=8)
    sparse = plan_opfence(
        gpt_graph, _slots(speeds), links, micro_batches=8, compression=topk_on_slow_links
    )
    assert sparse.step_s <= dense.step_s
    for x in sparse.links:
        if x.crosses_islands and x.fwd_bytes > x.data_bytes:
            assert (x.fwd_codec, x.fwd_ratio) == ("topk", 10.0)
        if not x.crosses_islands:
            assert x.fwd_codec == "none"


# -- the two-region gpt --------------------------------------------------------------------


def test_two_regions_plan_crosses_the_slow_link_at_most_once_and_beats_even(
    gpt_graph: Graph,
) -> None:
    # Two fast hosts in each region, 20 Mbit/s between, registered interleaved A, B, A, B.
    speeds = {"a1": 10.0, "b1": 10.0, "a2": 10.0, "b2": 10.0}
    hosts = {w: w[0] for w in speeds}
    links = _regions(hosts, inside=1000 * MBIT, between=20 * MBIT)
    workers = _slots(speeds)
    plan = plan_opfence(gpt_graph, workers, links, micro_batches=8)
    even = plan_even_baseline(gpt_graph, workers, links, micro_batches=8)
    print(plan.explain())
    print(even.explain())
    regions = [hosts[w] for w in plan.stage_workers]
    assert sum(a != b for a, b in itertools.pairwise(regions)) <= 1
    heavy = [x for x in plan.links if x.crosses_islands and x.fwd_bytes > x.data_bytes]
    assert len(heavy) <= 1
    assert sum(a != b for a, b in itertools.pairwise(hosts[w] for w in even.stage_workers)) == 3
    print(f"predicted step: opfence {plan.step_s:.3f} s, even {even.step_s:.3f} s")
    assert plan.step_s < 0.6 * even.step_s


def test_plan_round_trips_through_json_and_explains_itself(gpt_graph: Graph) -> None:
    speeds = {"a1": 10.0, "b1": 10.0, "a2": 10.0, "b2": 10.0}
    hosts = {w: w[0] for w in speeds}
    links = _regions(hosts, inside=1000 * MBIT, between=20 * MBIT)
    even = plan_even_baseline(gpt_graph, _slots(speeds), links, micro_batches=8)
    assert OpFencePlan.from_dict(json.loads(json.dumps(even.to_dict()))) == even
    text = even.explain(names={"a1": "alpha"})
    print(text)
    assert "island 0: alpha, a2" in text and "island 1: b1, b2" in text
    assert "stage 3 on b2 (island 1)" in text
    assert "stage 1->2 b1->a2 CROSSES ISLANDS: fwd 128 KiB @ 20Mbit/s" in text
    assert f"predicted step {even.step_s:.4g} s" in text


def test_workers_without_a_measured_speed_sit_out(gpt_graph: Graph) -> None:
    workers = [WorkerSlot("a", "a", "", 10.0), WorkerSlot("new", "new", "", 0.0)]
    links = BandwidthMatrix.uniform(["a", "new"], 100 * MBIT, 0.01)
    plan = plan_opfence(gpt_graph, workers, links, micro_batches=4)
    assert plan.stage_workers == ("a",)
    with pytest.raises(ValueError, match="measured speed"):
        plan_opfence(gpt_graph, workers[1:], links, micro_batches=4)


# -- optimality against an exhaustive search ---------------------------------------------


def _instance(seed: int) -> tuple[BlockChain, dict[str, float], BandwidthMatrix, int]:
    """4-6 workers of random speed in 1-3 random islands (fast inside, 0.5-5 MB/s between,
    each directed pair jittered), a chain of 6-10 blocks of random cost, each reading the
    previous block's output (random size, with gradient), some reading two back, and the
    data read by the last block."""
    rng = random.Random(seed)
    ids = [f"w{i}" for i in range(rng.randint(4, 6))]
    k = rng.randint(1, 3)
    order = rng.sample(ids, len(ids))
    cuts = sorted(rng.sample(range(1, len(ids)), k - 1))
    home = {}
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(ids)], strict=True)):
        home.update({w: i for w in order[a:b]})
    speeds = {w: rng.uniform(2.0, 20.0) for w in ids}
    inside = [rng.uniform(50e6, 1.25e9) for _ in range(k)]
    between = {(a, b): rng.uniform(0.5e6, 5e6) for a in range(k) for b in range(a + 1, k)}
    measured = {}
    for a in ids:
        for b in ids:
            if a == b:
                continue
            ia, ib = sorted((home[a], home[b]))
            if ia == ib:
                bw, rtt = inside[ia], rng.uniform(2e-4, 2e-3)
            else:
                bw, rtt = between[(ia, ib)], rng.uniform(0.02, 0.15)
            measured[(a, b)] = (bw * rng.uniform(0.8, 1.25), rtt)
    n = rng.randint(6, 10)
    blocks = []
    for _ in range(n):
        f = rng.uniform(0.02, 0.3) * 1e9
        params = rng.randint(10_000, 1_000_000)
        blocks.append(Block(f, 2 * f * rng.uniform(0.8, 1.2), 1, params, 4 * params))

    def size(lo: float, hi: float) -> int:
        return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    values = []
    for b in range(1, n):
        nbytes = size(1e4, 2e6)
        values.append(ChainValue(b - 1, (b,), nbytes, nbytes))
        if b + 1 < n and rng.random() < 0.3:
            nbytes = size(1e3, 5e5)
            values.append(ChainValue(b - 1, (b + 1,), nbytes, nbytes))
    values.append(ChainValue(0, (n - 1,), 2048, 0, data=True))
    links = BandwidthMatrix.of(measured)
    return BlockChain(tuple(blocks), tuple(values)), speeds, links, rng.choice([4, 8])


class _Exhaustive:
    """The least simulated step over every stage count, every contiguous cut and every
    injective placement, better than the incumbent `best` (or the incumbent itself).

    Branch and bound, pruning only what provably cannot beat the incumbent. Every block
    reads the previous one's output and sends a gradient back, so with stages 0..s placed:
    stage s's first forward cannot start before sum_{t<s} (f_t + x_t) (forwards and
    forward messages of micro-batch 0 in turn); it then runs M (f_s + b_s) of ops; stage
    0's last backward waits for stage s's through sum_{t<s} (y_t + b_t); and the step ends
    after stage 0's optimizer step. (x_t, y_t: one message's occupancy plus latency.)
    """

    def __init__(
        self, chain: BlockChain, speeds: dict[str, float], links: BandwidthMatrix, m: int
    ) -> None:
        self.chain, self.links, self.m = chain, links, m
        self.speeds, self.ids = speeds, list(speeds)
        self.est = Estimator(speeds, links)

    def run(self, best: float) -> float:
        self.best = best
        n = len(self.chain.blocks)
        for s in range(1, min(len(self.ids), n) + 1):
            for cuts in itertools.combinations(range(1, n), s - 1):
                self.load = self.chain.load((0, *cuts))
                self.stages = s
                self.next = {t.src: t for t in self.load.transfers if t.dst == t.src + 1}
                assert all(j in self.next and self.next[j].bwd_bytes for j in range(s - 1))
                self.fb = {
                    (j, w): sum(self.est.stage_seconds(st, w))
                    for j, st in enumerate(self.load.stages)
                    for w in self.ids
                }
                params = self.load.stages[0].params
                self.opt0 = {
                    w: self.est.compute.step_seconds(params, w, self.speeds[w]) for w in self.ids
                }
                self.placed: list[str] = []
                self._place(0, 0.0, 0.0)
        return self.best

    def _place(self, j: int, before: float, bound: float) -> None:
        links, placed = self.links, self.placed
        if j == self.stages:
            step = self.est.step(self.load, [tuple(placed)], micro_batches=self.m)
            self.best = min(self.best, step.total_s)
            return
        for w in self.ids:
            if w in placed:
                continue
            here = before
            if j:
                t, u = self.next[j - 1], placed[-1]
                here += t.fwd_bytes / links.bandwidth(u, w) + links.latency(u, w)
                here += t.bwd_bytes / links.bandwidth(w, u) + links.latency(w, u)
            lower = max(bound, here + self.m * self.fb[(j, w)] + self.opt0[placed[0] if j else w])
            if lower >= self.best:
                continue
            placed.append(w)
            self._place(j + 1, here + self.fb[(j, w)], lower)
            placed.pop()


def test_search_is_within_5_percent_of_exhaustive_on_200_small_instances() -> None:
    ratios = []
    for seed in range(200):
        chain, speeds, links, m = _instance(seed)
        plan = plan_chain(chain, speeds, links, micro_batches=m, compute_model=ComputeModel())
        assert plan.estimate.total_s == pytest.approx(
            Estimator(speeds, links)
            .step(chain.load(plan.starts), plan.placement, micro_batches=m)
            .total_s
        )
        optimum = _Exhaustive(chain, speeds, links, m).run(plan.estimate.total_s)
        ratios.append(plan.estimate.total_s / optimum)
    within = sum(r <= 1.05 for r in ratios) / len(ratios)
    print(
        f"OP-Fence within 5% of the exhaustive optimum on {within:.1%} of {len(ratios)} "
        f"instances; worst ratio {max(ratios):.3f}, mean {sum(ratios) / len(ratios):.4f}"
    )
    assert within >= 0.95
