"""The workload estimator on cases small enough to check by hand: compute, transfers,
the 1F1B event simulation, FIFO links, replicas' averaging by sync policy, compression,
calibration."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coordinator.planning.compute import ComputeModel, StageTiming, fit_compute_model
from coordinator.planning.estimator import Estimator, StepEstimate
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.simulator import simulate_1f1b, simulated_ops
from coordinator.planning.sync_spec import SyncSpec
from coordinator.planning.workload import (
    BlockChain,
    EdgeLoad,
    PipelineLoad,
    StageLoad,
    load_from_partition,
)
from opdag.capture import capture
from opdag.ir import Graph
from opdag.partition import balanced_assignment, partition
from opdag.schedule import one_f_one_b as workers_one_f_one_b
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

GFLOP = 1e9
NO_STEP = ComputeModel(step_flops_per_param=0.0)


def _estimator(
    bandwidth: float = 1e6, rtt: float = 0.0, compute: ComputeModel = NO_STEP, **kw: object
) -> Estimator:
    ids = ["a", "b", "c", "d"]
    return Estimator(
        {w: 1.0 for w in ids},
        BandwidthMatrix.uniform(ids, bandwidth, rtt),
        compute=compute,
        **kw,  # type: ignore[arg-type]
    )


def test_one_stage_takes_micro_batches_times_forward_and_backward_plus_the_optimizer_step() -> None:
    est = _estimator(compute=ComputeModel(step_flops_per_param=10.0))
    load = PipelineLoad((StageLoad(1 * GFLOP, 2 * GFLOP, 1, params=50_000_000),), ())
    step = est.step(load, [["a"]], micro_batches=4)
    # 4 x (1 s + 2 s) at 1 GFLOP/s, then 10 FLOPs x 5e7 parameters = 0.5 s of step.
    assert step.total_s == pytest.approx(12.5)
    assert step.stage_compute_s == pytest.approx((12.5,))
    assert step.links == ()
    assert "stage 0 compute on a" in step.bottleneck


def test_compute_time_is_flops_over_speed_times_efficiency_plus_node_overhead() -> None:
    model = ComputeModel(efficiency={"a": 0.5}, node_overhead_s=0.01)
    assert model.seconds(2 * GFLOP, 3, "a", 4.0) == pytest.approx(1.0 + 0.03)
    assert model.seconds(2 * GFLOP, 0, "z", 4.0) == pytest.approx(0.5)  # default efficiency 1


def test_transfer_time_is_bytes_over_bandwidth_plus_half_the_round_trip() -> None:
    est = _estimator(bandwidth=1e6, rtt=0.2)
    assert est.transfer_seconds(500_000, "a", "b") == pytest.approx(0.5 + 0.1)
    assert est.transfer_seconds(500_000, "a", "a") == 0.0


def test_two_stages_on_a_slow_link_are_bound_by_the_transfers() -> None:
    # No compute at all, 1 s per message each way: forward and backward streams overlap,
    # so M micro-batches take M link-seconds plus one round trip's worth, not 2M.
    est = _estimator(bandwidth=1e6)
    load = PipelineLoad(
        (StageLoad(0.0, 0.0, 0), StageLoad(0.0, 0.0, 0)), (EdgeLoad(0, 1, 1_000_000, 1_000_000),)
    )
    step = est.step(load, [["a", "b"]], micro_batches=4)
    assert step.total_s == pytest.approx(5.0)
    assert "link" in step.bottleneck
    busy = {(x.src_worker, x.dst_worker): x.busy_s for x in step.links}
    assert busy == {("a", "b"): pytest.approx(4.0), ("b", "a"): pytest.approx(4.0)}


def test_two_stages_with_compute_follow_the_hand_computed_1f1b_timeline() -> None:
    # f = 1 s, b = 2 s per micro-batch on each stage; 1 s per message each way.
    est = _estimator(bandwidth=1e6, warmup=0)
    stage = StageLoad(1 * GFLOP, 2 * GFLOP, 1)
    load = PipelineLoad((stage, stage), (EdgeLoad(0, 1, 1_000_000, 1_000_000),))
    assert est.step(load, [["a", "b"]], micro_batches=4).total_s == pytest.approx(19.0)
    # One extra warm-up forward changes nothing here: stage 0's B0 still waits for g0 at 7.
    once = _estimator(bandwidth=1e6, warmup=1)
    assert once.step(load, [["a", "b"]], micro_batches=4).total_s == pytest.approx(19.0)
    # Two (stage 0: F0-F3 then B0-B3; stage 1: F0 F1 F2 B0 F3 B1 B2 B3): stage 1 runs F0-F2
    # over [2, 5] as activations arrive, B0 [5, 7], F3 [7, 8], B1 [8, 10], B2 [10, 12], B3
    # [12, 14]; gradients arrive at 8, 11, 13, 15, so stage 0's backwards end at 17.
    auto = _estimator(bandwidth=1e6).step(load, [["a", "b"]], micro_batches=4)
    assert auto.total_s == pytest.approx(17.0)
    assert auto.warmup_extra == 2  # GPipe (3) ends at 17 too: the shallower is kept
    # On a link 1000x faster the same plan is compute bound: (M + S - 1) x (f + b) = 15 s,
    # plus the four 1 ms messages on its critical path.
    fast = _estimator(bandwidth=1e9, warmup=0)
    assert fast.step(load, [["a", "b"]], micro_batches=4).total_s == pytest.approx(15.004)
    # Two extra warm-up forwards keep stage 1 busy from its first activation (1.001 s) to
    # its last backward (13.001 s): only its first input and last gradient are waited for.
    deeper = _estimator(bandwidth=1e9).step(load, [["a", "b"]], micro_batches=4)
    assert deeper.total_s == pytest.approx(15.002)
    assert deeper.warmup_extra == 2


def test_messages_on_one_link_queue_first_in_first_out_and_latency_does_not_occupy_it() -> None:
    # Stage 0 is free and sends all three forwards at once; each takes the link 1 s, then
    # flies 0.5 s. Stage 1 (free too) finishes when the third has arrived.
    ends = simulate_1f1b([0.0, 0.0], [0.0, 0.0], [(0, 1, None, 1.0, 0.5, None, 0.0)], 3)
    assert ends == pytest.approx([0.0, 3.5])


def test_data_for_a_later_stage_leave_stage_zero_when_its_forward_starts() -> None:
    # Stage 0 computes 1 s per forward; stage 1 only needs 2 s of data from it, which
    # leave at each forward's start, so they are not delayed by its compute.
    ends = simulate_1f1b([1.0, 0.0], [0.0, 0.0], [(0, 1, 2.0, None, 0.0, None, 0.0)], 2)
    assert ends[1] == pytest.approx(4.0)
    with_acts = simulate_1f1b([1.0, 0.0], [0.0, 0.0], [(0, 1, 2.0, 0.5, 0.0, None, 0.0)], 2)
    # The activations of the first forward queue behind its own data: 2 + 0.5, then the
    # second's data and activations: 5 s.
    assert with_acts[1] == pytest.approx(5.0)


def test_stage_zero_data_sends_to_the_last_stage_count_in_the_step() -> None:
    est = _estimator(bandwidth=1e6)
    stage = StageLoad(0.1 * GFLOP, 0.2 * GFLOP, 1)
    cheap = PipelineLoad((stage,) * 3, (EdgeLoad(0, 1, 1000, 1000), EdgeLoad(1, 2, 1000, 1000)))
    with_data = PipelineLoad(
        cheap.stages, (*cheap.transfers, EdgeLoad(0, 2, 0, 0, data_bytes=3_000_000))
    )
    base = est.step(cheap, [["a", "b", "c"]], micro_batches=2).total_s
    slow = est.step(with_data, [["a", "b", "c"]], micro_batches=2)
    assert slow.total_s > base + 3.0  # the second micro-batch's 3 s of data gate stage 2
    data = [x for x in slow.links if (x.src_stage, x.dst_stage) == (0, 2)]
    assert data and data[0].dense_bytes == 6_000_000


def test_estimator_schedule_is_the_workers_1f1b() -> None:
    for stages in (1, 2, 4):
        for m in (1, 3, 8):
            for s in range(stages):
                ours = [("B" if b else "F", mb) for b, mb in simulated_ops(s, stages, m)]
                theirs = [(op.kind, op.micro_batch) for op in workers_one_f_one_b(s, stages, m)]
                assert ours == theirs


def test_replicas_average_all_to_all_over_the_slowest_link() -> None:
    links = BandwidthMatrix.of(
        {("a", "b"): (1e6, 0.02), ("b", "a"): (2e6, 0.02)}, default_bandwidth_Bps=1e9
    )
    est = Estimator({"a": 1.0, "b": 1.0}, links, compute=NO_STEP)
    load = PipelineLoad((StageLoad(1 * GFLOP, 2 * GFLOP, 1, params=1, param_bytes=4_000_000),), ())
    step = est.step(load, [["a"], ["b"]], micro_batches=4)
    # Each replica runs 2 micro-batches (6 s); `sync` (the default) sends the 4 MB of
    # gradients to the other member every step at 1 MB/s (the slower direction), then
    # waits one round trip (20 ms) for the send to be taken.
    assert step.micro_batches == 2 and step.replicas == 2
    assert step.averaging_s == pytest.approx((4.0 + 0.02,))
    assert step.averaging_bytes == (4_000_000,)
    assert step.total_s == pytest.approx(6.0 + 4.02)
    with pytest.raises(ValueError, match="do not split"):
        est.step(load, [["a"], ["b"]], micro_batches=3)


def test_each_member_sends_its_share_to_every_other_over_one_uplink() -> None:
    # Three members: each sends R-1 = 2 copies of its 3 MB, over the slowest link of the
    # group (1 MB/s, though most are faster): 6 s, not a ring's 2(R-1)/R x 3 MB = 4 s.
    ids = ["a", "b", "c"]
    figures = {(x, y): (10e6, 0.0) for x in ids for y in ids if x != y}
    figures[("c", "a")] = (1e6, 0.0)
    est = Estimator({w: 1.0 for w in ids}, BandwidthMatrix.of(figures), compute=NO_STEP)
    assert est.averaging_seconds(3_000_000, ids) == pytest.approx(6.0)
    assert est.averaging_bytes(3_000_000, 3) == 6_000_000
    assert est.averaging_seconds(3_000_000, ["a"]) == 0.0


def _averaging(sync: SyncSpec) -> tuple[float, ...]:
    ids = ["a", "b", "c", "d"]
    est = Estimator(
        {w: 1.0 for w in ids}, BandwidthMatrix.uniform(ids, 1e6, 0.0), compute=NO_STEP, sync=sync
    )
    stage = StageLoad(1 * GFLOP, 2 * GFLOP, 1, params=1, param_bytes=8_000_000)
    return est.step(PipelineLoad((stage,), ()), [["a"], ["b"]], micro_batches=2).averaging_s


def test_local_sgd_pays_one_round_per_period_and_fp16_half_the_bytes() -> None:
    every_step = _averaging(SyncSpec())[0]
    assert every_step == pytest.approx(8.0)  # 8 MB to the one other member at 1 MB/s
    for kind in ("local-sgd", "partial-local-sgd"):
        # Partial local SGD is priced as local SGD: the workers average after the
        # optimizer step, so its rounds do not hide behind the backward pass.
        assert _averaging(SyncSpec(kind=kind, period=8))[0] == pytest.approx(every_step / 8)
        assert _averaging(SyncSpec(kind=kind, period=8, values="fp16"))[0] == pytest.approx(
            every_step / 16
        )
    assert _averaging(SyncSpec(values="fp16"))[0] == pytest.approx(every_step / 2)


def test_between_rounds_the_loss_stage_of_local_sgd_still_trips_once_a_step() -> None:
    links = BandwidthMatrix.uniform(["a", "b"], 1e6, 0.1)  # 50 ms each way
    est = Estimator(
        {"a": 1.0, "b": 1.0}, links, compute=NO_STEP, sync=SyncSpec(kind="local-sgd", period=4)
    )
    # One round every 4 steps (4 s of bytes and a 0.1 s round trip), amortised, and the
    # loss's round trip on the 3 steps without one.
    assert est.averaging_seconds(4_000_000, ["a", "b"]) == pytest.approx((4.0 + 0.1) / 4)
    assert est.averaging_seconds(4_000_000, ["a", "b"], carries_loss=True) == pytest.approx(
        (4.0 + 0.1) / 4 + 0.1 * 3 / 4
    )


def test_a_placement_reusing_a_worker_is_refused() -> None:
    est = _estimator()
    stage = StageLoad(1.0, 1.0, 1)
    load = PipelineLoad((stage, stage), (EdgeLoad(0, 1, 10, 10),))
    with pytest.raises(ValueError, match="two stages"):
        est.step(load, [["a", "a"]], micro_batches=2)


def test_compression_policy_shrinks_what_the_link_carries_and_is_reported() -> None:
    calls = []

    def topk(dense: int, bandwidth: float, budget: float) -> tuple[str, float, int]:
        calls.append((dense, bandwidth, budget))
        return "topk", 4.0, dense // 4

    est = _estimator(bandwidth=1e6, compression=topk)
    load = PipelineLoad(
        (StageLoad(0.0, 0.0, 0), StageLoad(0.0, 0.0, 0)), (EdgeLoad(0, 1, 1_000_000, 1_000_000),)
    )
    step = est.step(load, [["a", "b"]], micro_batches=4)
    assert step.total_s == pytest.approx(5.0 / 4)
    assert {(x.codec, x.ratio, x.wire_bytes) for x in step.links} == {("topk", 4.0, 1_000_000)}
    assert calls and calls[0][:2] == (1_000_000, 1e6)


def test_step_estimate_round_trips_through_json() -> None:
    est = _estimator(bandwidth=1e6)
    stage = StageLoad(1 * GFLOP, 2 * GFLOP, 1)
    load = PipelineLoad((stage, stage), (EdgeLoad(0, 1, 1_000_000, 1_000_000),))
    step = est.step(load, [["a", "b"]], micro_batches=4)
    assert StepEstimate.from_dict(json.loads(json.dumps(step.to_dict()))) == step


def _timings(truth: ComputeModel, speeds: dict[str, float]) -> list[StageTiming]:
    out = []
    for i, (w, g) in enumerate(speeds.items()):
        for fwd, nodes in ((1e9 + i * 1e8, 20), (3e9, 90), (0.4e9, 7)):
            out.append(
                StageTiming(
                    w,
                    g,
                    fwd,
                    2 * fwd,
                    nodes,
                    truth.seconds(fwd, nodes, w, g),
                    truth.seconds(2 * fwd, nodes, w, g),
                )
            )
    return out


def test_calibration_fit_recovers_known_efficiencies_and_overhead() -> None:
    speeds = {"a": 50.0, "b": 10.0, "c": 120.0}
    truth = ComputeModel(efficiency={"a": 0.35, "b": 0.8, "c": 0.6}, node_overhead_s=2e-4)
    fitted = fit_compute_model(_timings(truth, speeds))
    for w in speeds:
        assert fitted.efficiency[w] == pytest.approx(truth.efficiency[w], rel=1e-6)
    assert fitted.node_overhead_s == pytest.approx(2e-4, rel=1e-6)
    assert fitted.default_efficiency == pytest.approx(0.6)  # the median of the fitted
    # After the fit, a plan's predicted step matches the one the "real" workers give.
    links = BandwidthMatrix.uniform(list(speeds), 1e8, 0.001)
    load = PipelineLoad(
        (StageLoad(2e9, 4e9, 40), StageLoad(1e9, 2e9, 30)), (EdgeLoad(0, 1, 10**6, 10**6),)
    )
    real = Estimator(speeds, links, compute=truth).step(load, [["a", "b"]], micro_batches=4)
    pred = Estimator(speeds, links, compute=fitted).step(load, [["a", "b"]], micro_batches=4)
    assert pred.total_s == pytest.approx(real.total_s, rel=1e-6)


def test_calibration_that_cannot_place_the_overhead_keeps_the_prior_and_fits_a_ratio() -> None:
    # Forward alone says efficiency 0.5, backward alone 1/2.1; together they would need a
    # negative per-node overhead, so the prior's overhead stays and the ratio is fitted.
    timing = StageTiming("a", 10.0, 1e9, 2e9, 5, 0.2, 0.42)
    prior = ComputeModel(node_overhead_s=0.0)
    fitted = fit_compute_model([timing], prior=prior)
    assert fitted.node_overhead_s == 0.0
    assert 1 / 2.1 < fitted.efficiency["a"] < 0.5


GPT = {"layers": 2, "d_model": 32, "heads": 2, "context": 16}


@pytest.fixture(scope="module")
def gpt_graph() -> Graph:
    return capture(build_model("gpt", GPT), example_batch("gpt", GPT, 4, device="meta")).graph


def test_chain_load_equals_the_load_of_the_partition_of_a_captured_gpt(gpt_graph: Graph) -> None:
    assignment = balanced_assignment(gpt_graph, 3)
    order = [assignment[n.name] for n in gpt_graph.compute_nodes]
    starts = [0, *(i for i in range(1, len(order)) if order[i] != order[i - 1])]
    ours = BlockChain.from_graph(gpt_graph).load(starts)
    theirs = load_from_partition(partition(gpt_graph, assignment))
    assert ours.transfers == theirs.transfers
    for a, b in zip(ours.stages, theirs.stages, strict=True):
        assert (a.nodes, a.params, a.param_bytes) == (b.nodes, b.params, b.param_bytes)
        assert (a.fwd_flops, a.bwd_flops) == pytest.approx((b.fwd_flops, b.bwd_flops))
    # The targets reach the last stage as data from stage 0, with no gradient back.
    data = [t for t in ours.transfers if t.data_bytes]
    assert [(t.src, t.dst) for t in data] == [(0, 2)]


def test_the_schedule_goes_no_deeper_than_each_workers_memory_holds() -> None:
    # The slow-link case above (depth 2 ends at 17 s, 1F1B at 19 s), with 1 MB of
    # activations per micro-batch in flight: stage 0 holds 2, 3, 4 micro-batches at depths
    # 0, 1, 2 (and 4 MB of state for its 1 MB of parameters: 4x, for Adam).
    stage = StageLoad(1 * GFLOP, 2 * GFLOP, 1, params=250_000, param_bytes=1_000_000)
    stage = dataclasses.replace(stage, act_bytes=1_000_000)
    load = PipelineLoad((stage, stage), (EdgeLoad(0, 1, 1_000_000, 1_000_000),))

    def step(memory: int) -> StepEstimate:
        est = _estimator(bandwidth=1e6, memory={"a": memory, "b": memory})
        return est.step(load, [["a", "b"]], micro_batches=4)

    assert (step(7_000_000).warmup_extra, step(7_000_000).total_s) == (0, pytest.approx(19.0))
    assert step(8_000_000).warmup_extra == 2 and step(8_000_000).total_s == pytest.approx(17.0)
    # Memory unknown (0): nothing is assumed, the fastest depth is taken.
    assert step(0).warmup_extra == 2
    # Too little memory even for 1F1B: 1F1B all the same (no schedule holds less).
    assert step(1_000).warmup_extra == 0
