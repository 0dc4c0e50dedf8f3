"""From a job spec and the free workers to the plan the coordinator hands out: the planner
the spec names, exact stage counts, per-link codecs chosen with the plan, and
predictions re-made under a calibrated compute model."""

from __future__ import annotations

import itertools

import pytest
import yaml

from coordinator.planning.compute import ComputeModel
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import WorkerSlot
from coordinator.planning.planner import PlanRequest, make_plan, predict
from opdag.capture import capture
from opdag.ir import Graph
from opdag.partition import partition
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

MBIT = 1e6 / 8
GPT = {"layers": 4, "d_model": 128, "heads": 4, "context": 64}
# Two regions, registered interleaved: eu1, us1, eu2, us2.
WORKERS = [
    WorkerSlot("eu1", "eu1", "10.77.0.2:7100", 20.0),
    WorkerSlot("us1", "us1", "10.77.0.3:7100", 20.0),
    WorkerSlot("eu2", "eu2", "10.77.0.4:7100", 20.0),
    WorkerSlot("us2", "us2", "10.77.0.5:7100", 20.0),
]
REGION = {"eu1": "eu", "eu2": "eu", "us1": "us", "us2": "us"}
FIGURES = {
    (a, b): (200 * MBIT, 0.001) if REGION[a] == REGION[b] else (20 * MBIT, 0.02)
    for a in REGION
    for b in REGION
    if a != b
}


@pytest.fixture(scope="module")
def graph() -> Graph:
    model = build_model("gpt", GPT, seed=0)
    return capture(model, example_batch("gpt", GPT, 4, device="meta"), name="gpt").graph


def spec(**extra: object) -> JobSpec:
    doc = {
        "name": "plan",
        "model": {"zoo": "gpt", "args": GPT},
        "data": {"corpus": "stdlib-text", "batch_size": 16, "micro_batches": 4},
        "steps": 10,
        **extra,
    }
    return parse_job_spec(yaml.safe_dump(doc))


def request(graph: Graph, job: JobSpec, figures: dict = FIGURES) -> PlanRequest:  # type: ignore[type-arg]
    return PlanRequest("j", 1, 0, graph, job, WORKERS, figures, ComputeModel())


def crossings(plan_workers: tuple[str, ...]) -> int:
    return sum(REGION[a] != REGION[b] for a, b in itertools.pairwise(plan_workers))


def test_opfence_keeps_heavy_cuts_inside_a_region_and_predicts_below_even(graph: Graph) -> None:
    opf, cut = make_plan(request(graph, spec()))
    even, _ = make_plan(request(graph, spec(parallel={"planner": "even"})))
    assert opf.planner == "opfence" and even.planner == "even"
    assert crossings(opf.worker_ids) <= 1
    assert crossings(even.worker_ids) == 3  # registration order alternates regions
    assert opf.predicted_step_s < even.predicted_step_s
    assert dict(partition(graph, opf.assignment).assignment) == dict(cut.assignment)
    assert "islands (2)" in opf.explanation and "cut links" in opf.explanation


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_a_fixed_stage_count_is_met_exactly(graph: Graph, stages: int) -> None:
    plan, cut = make_plan(request(graph, spec(parallel={"stages": stages})))
    assert plan.num_stages == stages == len(cut.stages)
    assert len(set(plan.worker_ids)) == stages


def test_fixed_topk_compresses_every_cut_link_and_adatopk_only_the_slow_ones(
    graph: Graph,
) -> None:
    four = {"planner": "even", "stages": 4}  # eu1 us1 eu2 us2: every cut crosses regions
    plan, _ = make_plan(request(graph, spec(parallel=four, compression={"topk": 0.1})))
    assert [(c.src_stage, c.dst_stage) for c in plan.codecs] == [(0, 1), (1, 2), (2, 3)]
    assert all(c.ratio == 0.1 and c.wire_bytes < c.dense_bytes / 5 for c in plan.codecs)

    plan, _ = make_plan(request(graph, spec(parallel=four, compression="adatopk")))
    assert len(plan.codecs) == 3 and all(c.ratio < 1 for c in plan.codecs)
    # The same cut on links fast everywhere needs no compression.
    fast = {k: (200 * MBIT, 0.001) for k in FIGURES}
    plan, _ = make_plan(request(graph, spec(parallel=four, compression="adatopk"), fast))
    assert plan.codecs == ()
    plan, _ = make_plan(request(graph, spec(parallel=four)))
    assert plan.codecs == ()


def test_adatopk_makes_the_slow_link_cheaper_in_the_prediction(graph: Graph) -> None:
    two = {"planner": "even", "stages": 2}  # eu1 -> us1 across the slow link
    exact, _ = make_plan(request(graph, spec(parallel=two)))
    squeezed, _ = make_plan(request(graph, spec(parallel=two, compression="adatopk")))
    assert squeezed.predicted_step_s < exact.predicted_step_s
    (codec,) = squeezed.codecs
    assert codec.codec == "sampled_topk" and 0.01 <= codec.ratio < 1


def test_a_calibrated_model_changes_the_prediction_as_the_speed_does(graph: Graph) -> None:
    plan, _ = make_plan(request(graph, spec(parallel={"planner": "even", "stages": 2})))
    speeds = {w.worker_id: w.gflops for w in WORKERS}
    job = spec(parallel={"planner": "even", "stages": 2})
    same = predict(plan, graph, job, speeds, FIGURES, ComputeModel())
    assert same == pytest.approx(plan.predicted_step_s)
    slow = predict(plan, graph, job, speeds, FIGURES, ComputeModel(default_efficiency=0.1))
    assert slow > 2 * same


def test_without_any_link_measured_the_plan_still_uses_every_worker(graph: Graph) -> None:
    plan, _ = make_plan(request(graph, spec(), {}))
    assert plan.num_stages >= 2
