"""The micro-batch schedule at every warm-up depth: each micro-batch's forward and backward
once, backwards in micro-batch order, at most `in_flight` activations held, GPipe at the
deepest, and no deadlock whatever the depth; the planner's choice and the spec's override
reach `plan show` and the workers' stage plans."""

from __future__ import annotations

import itertools

import pytest
import yaml

from archipelago.job_lines import format_stage_times
from coordinator.planning.jobspec import JobSpecError, parse_job_spec
from coordinator.planning.plan import Placement, Plan, WorkerSlot
from coordinator.step_metrics import stage_times
from opdag.capture import capture
from opdag.schedule import Op, in_flight, one_f_one_b
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages

pytestmark = pytest.mark.unit

SHAPES = list(itertools.product(range(1, 5), range(1, 7), range(0, 8)))


def _run_without_deadlock(num_stages: int, micro_batches: int, extra: int) -> list[list[Op]]:
    """Every stage's schedule run as workers run it: an op waits for its inputs (the
    forward of the stage before, the backward of the stage after); raises on a deadlock."""
    ops = [list(one_f_one_b(s, num_stages, micro_batches, extra)) for s in range(num_stages)]
    done: set[tuple[int, str, int]] = set()
    ptr = [0] * num_stages
    while any(p < len(o) for p, o in zip(ptr, ops, strict=True)):
        moved = False
        for s in range(num_stages):
            if ptr[s] == len(ops[s]):
                continue
            op = ops[s][ptr[s]]
            if op.kind == "F":
                ready = s == 0 or (s - 1, "F", op.micro_batch) in done
            else:
                ready = (s, "F", op.micro_batch) in done and (
                    s == num_stages - 1 or (s + 1, "B", op.micro_batch) in done
                )
            if ready:
                done.add((s, op.kind, op.micro_batch))
                ptr[s] += 1
                moved = True
        if not moved:
            raise AssertionError(f"deadlock at {ptr} for {num_stages, micro_batches, extra}")
    return ops


@pytest.mark.parametrize(("num_stages", "micro_batches", "extra"), SHAPES)
def test_every_depth_runs_each_micro_batch_once_in_order_without_deadlock(
    num_stages: int, micro_batches: int, extra: int
) -> None:
    ops = _run_without_deadlock(num_stages, micro_batches, extra)
    for s, stage_ops in enumerate(ops):
        forwards = [o.micro_batch for o in stage_ops if o.kind == "F"]
        backwards = [o.micro_batch for o in stage_ops if o.kind == "B"]
        assert forwards == backwards == list(range(micro_batches))
        alive, most = 0, 0
        for o in stage_ops:
            alive += 1 if o.kind == "F" else -1
            most = max(most, alive)
        assert most == in_flight(s, num_stages, micro_batches, extra)


def test_no_extra_is_classic_1f1b_and_the_deepest_is_gpipe() -> None:
    assert [str(o) for o in one_f_one_b(0, 2, 4)] == "F0 F1 B0 F2 B1 F3 B2 B3".split()
    assert [str(o) for o in one_f_one_b(0, 2, 4, 1)] == "F0 F1 F2 B0 F3 B1 B2 B3".split()
    for s in range(3):
        gpipe = [str(o) for o in one_f_one_b(s, 3, 4, 3)]
        assert gpipe == "F0 F1 F2 F3 B0 B1 B2 B3".split()


@pytest.mark.parametrize("extra", [-1, 1.5, True, "2"])
def test_a_bad_depth_is_refused(extra: object) -> None:
    with pytest.raises(ValueError, match="extra warm-up must be a non-negative integer"):
        one_f_one_b(0, 2, 4, extra)  # type: ignore[arg-type]


SPEC = """
name: depth
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 4}}
steps: 2
parallel: {{stages: 2{warmup}}}
"""


def test_the_spec_takes_auto_or_a_depth_and_refuses_anything_else() -> None:
    assert parse_job_spec(SPEC.format(warmup="")).parallel.warmup is None
    assert parse_job_spec(SPEC.format(warmup=", warmup: auto")).parallel.warmup is None
    spec = parse_job_spec(SPEC.format(warmup=", warmup: 2"))
    assert spec.parallel.warmup == 2
    assert parse_job_spec(yaml.safe_dump(spec.to_dict())).parallel.warmup == 2
    for bad in ("-1", "deep", "1.5"):
        with pytest.raises(JobSpecError, match=r"parallel\.warmup"):
            parse_job_spec(SPEC.format(warmup=f", warmup: {bad}"))


def test_the_planners_depth_reaches_plan_show_and_every_stage_plan() -> None:
    workers = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7000 + i}", 10.0) for i in range(2)]
    args = {"layers": 2, "d_model": 32, "heads": 2, "context": 16}
    model = capture(build_model("gpt", args), example_batch("gpt", args, 2, device="meta"))
    forced = parse_job_spec(SPEC.format(warmup=", warmup: 2"))
    plan, stage_plans = planned_stages(model, forced, workers)
    assert plan.warmup_extra == 2
    assert "stage 0 holds up to 4 of its 4 micro-batches (parallel.warmup: 2 in the spec)" in (
        plan.explanation
    )
    assert [p.warmup_extra for p in stage_plans] == [2, 2]
    # Past GPipe's depth a forced warm-up is GPipe's.
    deepest = parse_job_spec(SPEC.format(warmup=", warmup: 100"))
    plan, stage_plans = planned_stages(model, deepest, workers)
    assert plan.warmup_extra == 3 and "GPipe" in plan.explanation
    auto, _ = planned_stages(model, parse_job_spec(SPEC.format(warmup="")), workers)
    assert "(the depth whose simulated step ends first)" in auto.explanation


def test_plan_show_gives_each_stages_compute_and_waiting_predicted_and_measured() -> None:
    placements = tuple(
        Placement(
            stage=s,
            worker_id=f"w{s}",
            worker_name=f"w{s}",
            address="",
            nodes=1,
            params=1,
            flops=1.0,
        )
        for s in range(2)
    )
    plan = Plan(
        job_id="j",
        epoch=2,
        planner="opfence",
        start_step=10,
        assignment={},
        placements=placements,
        predicted_step_s=3.0,
        stage_compute_s=(1.0, 2.5),
    )
    records = [
        {
            "epoch": 2,
            "stage": s,
            "step": step,
            "speaker": True,
            "compute_seconds": 0.5 + s,
            "step_seconds": 2.0,
        }
        for s in range(2)
        for step in range(10, 14)
    ]
    # Left out: another replica's report, and the plan's first step (warm-up, above).
    records.append(
        {
            "epoch": 2,
            "stage": 0,
            "step": 12,
            "speaker": False,
            "compute_seconds": 9.0,
            "step_seconds": 9.0,
        }
    )
    times = stage_times(plan, records)
    assert [(t.stage, t.steps_measured) for t in times] == [(0, 3), (1, 3)]
    assert times[0].predicted_compute_s == 1.0 and times[0].predicted_wait_s == 2.0
    assert times[1].predicted_wait_s == pytest.approx(0.5)
    assert times[0].measured_compute_s == pytest.approx(0.5)
    assert times[0].measured_wait_s == pytest.approx(1.5)
    assert times[1].measured_compute_s == pytest.approx(1.5)
    assert times[1].measured_wait_s == pytest.approx(0.5)
    text = format_stage_times([(0, 1.0, 2.0, 0.5, 1.5, 3), (1, 2.5, 0.5, 0.0, 0.0, 0)])
    lines = text.splitlines()
    assert lines[3].split() == ["0", "1.000", "0.500", "2.000", "1.500", "3"]
    assert lines[4].split() == ["1", "2.500", "-", "0.500", "-", "0"]  # nothing measured yet
