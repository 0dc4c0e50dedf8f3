"""The job spec's `trust` settings (`coordinator.planning.trust_spec`) reach every stage
and are checked on both sides: the value bounds a receiving stage applies and the steps it
keeps for spot checks; and the coordinator's recomputation of a stage
(`coordinator.spot_checks`), with plain PyTorch as the oracle."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
import yaml

from coordinator.checkpoints import Checkpoints
from coordinator.handover import StageHandover
from coordinator.planning.compute import ComputeModel
from coordinator.planning.jobspec import JobSpec, JobSpecError, parse_job_spec
from coordinator.planning.plan import WorkerSlot, stage_routes
from coordinator.planning.planner import PlanRequest, make_plan
from coordinator.serde import stage_assignment_pb
from coordinator.spot_checks import (
    fits,
    largest_difference,
    random_ops,
    recompute,
    recompute_step,
)
from opdag.capture import capture
from opdag.errors import CodecError
from opdag.ir import CapturedModel
from opdag.partition import Stage, balanced_assignment, partition
from opdag.stage import StageModule
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages
from worker.serde import stage_plan_from_pb
from worker.stage_job import StageJob
from worker.transfer_kind import TransferKind
from worker.value_guard import SuspectValue, ValueBounds

pytestmark = pytest.mark.unit

GPT = {"layers": 1, "d_model": 16, "heads": 2, "context": 8}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7300 + i}", 10.0) for i in range(3)]


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    m = build_model("gpt", GPT, seed=0)
    return capture(m, example_batch("gpt", GPT, 2, device="meta"), name="gpt")


def spec(stages: int = 2, **trust: Any) -> JobSpec:
    doc: dict[str, Any] = {
        "name": "trust",
        "model": {"zoo": "gpt", "args": GPT},
        "data": {"corpus": "stdlib-text", "batch_size": 4, "micro_batches": 2},
        "steps": 4,
        "parallel": {"planner": "even", "stages": stages},
    }
    if trust:
        doc["trust"] = trust
    return parse_job_spec(yaml.safe_dump(doc))


def test_trust_defaults_and_round_trip() -> None:
    s = spec()
    assert s.trust.values.to_plain() == dataclasses.asdict(ValueBounds())
    assert s.trust.spot_checks.on and s.trust.spot_checks.every > 1
    changed = spec(values={"factor": 20, "warmup": 3, "window": 5}, spot_checks={"every": 0})
    assert JobSpec.from_dict(changed.to_dict()) == changed
    assert not changed.trust.spot_checks.on


@pytest.mark.parametrize(
    ("trust", "error"),
    [
        ({"values": {"factor": 1}}, r"^trust\.values\.factor: must be in \(1, "),
        ({"values": {"warmup": 0}}, r"^trust\.values\.warmup: must be in \[1, 10000\]"),
        ({"values": {"warmup": 9, "window": 4}}, r"^trust\.values\.window: must be >= warmup"),
        ({"values": {"ceiling": 1e39}}, r"^trust\.values\.ceiling: must be in \(0, 1e\+38\]"),
        ({"values": {"ceiling": "big"}}, r"^trust\.values\.ceiling: must be a number"),
        ({"values": {"limit": 3}}, r"^trust\.values\.limit: unknown key"),
        ({"spot_checks": {"every": -1}}, r"^trust\.spot_checks\.every: must be in \[0, "),
        ({"spot_checks": {"every": True}}, r"^trust\.spot_checks\.every: must be an int"),
        ({"spot_checks": {"tolerance": 0}}, r"^trust\.spot_checks\.tolerance: must be in \(0, 1\]"),
        ({"spot_checks": {"keep": 17}}, r"^trust\.spot_checks\.keep: must be in \[1, 16\]"),
    ],
)
def test_a_bad_trust_setting_is_refused_by_name(trust: dict[str, Any], error: str) -> None:
    with pytest.raises(JobSpecError, match=error):
        spec(**trust)


def test_every_stage_is_told_the_jobs_value_bounds_and_what_to_keep(
    model: CapturedModel,
) -> None:
    s = spec(
        values={"factor": 20, "warmup": 3, "window": 5, "ceiling": 1e6},
        spot_checks={"every": 5, "keep": 3},
    )
    _, plans = planned_stages(model, s, WORKERS)
    assert len(plans) == 2
    for sp in plans:
        assert sp.value_bounds == ValueBounds(factor=20, warmup=3, window=5, ceiling=1e6)
        assert sp.spot_keep == 3
    # Off, or one stage (nobody to compare with): nothing kept.
    _, off = planned_stages(model, spec(spot_checks={"every": 0}), WORKERS)
    _, alone = planned_stages(model, spec(stages=1), WORKERS)
    assert [sp.spot_keep for sp in off + alone] == [0, 0, 0]
    assert all(sp.value_bounds == ValueBounds() for sp in off + alone)


def assignment(model: CapturedModel, s: JobSpec) -> Any:
    request = PlanRequest("j", 1, 0, model.graph, s, WORKERS, {}, ComputeModel())
    plan, cut = make_plan(request)
    stage = cut.stages[1]
    handover = StageHandover(
        job_id="j",
        epoch=1,
        stage=stage,
        plan=plan,
        routes=stage_routes(cut)[1],
        spec=s,
        fingerprint="",
        start_step=0,
        secret="s" * 32,
        tensors=Checkpoints.stage_tensors("j", stage, model.state),
        replica=0,
    )
    return stage_assignment_pb(handover)


def test_a_worker_refuses_bounds_it_cannot_apply(model: CapturedModel) -> None:
    a = assignment(model, spec())
    a.value_window = 2  # below the warm-up of 8
    with pytest.raises(CodecError, match="stage assignment: value bounds need"):
        stage_plan_from_pb(a)
    a = assignment(model, spec())
    a.value_ceiling = 1e39
    with pytest.raises(CodecError, match="stage assignment: value ceiling"):
        stage_plan_from_pb(a)
    a = assignment(model, spec())
    a.spot_keep = 1000
    with pytest.raises(CodecError, match="stage assignment: spot_keep 1000 is above 16"):
        stage_plan_from_pb(a)


class _Reporter:
    def __init__(self) -> None:
        self.reports: list[Any] = []

    def progress(self, report: Any) -> None:
        self.reports.append(report)

    async def checkpoint(self, *args: Any) -> None:
        return None


def _deliver_large(model: CapturedModel, s: JobSpec, value: float) -> _Reporter:
    """Build stage 1 of `s` and deliver it activations of stage 0 holding `value`."""
    sp = stage_plan_from_pb(assignment(model, s))
    params = {n: t for n, t in model.state.items() if n in sp.graph.param_specs}
    reporter = _Reporter()

    async def sender(*args: Any) -> int:
        return 0

    with ThreadPoolExecutor(1) as pool:
        job = StageJob.build(
            sp, params, device=torch.device("cpu"), compute=pool, sender=sender, reporter=reporter
        )
        values: dict[str, Any] = {}
        for name in job._expected_forward[0]:
            meta = sp.graph.node(name).meta
            assert meta is not None
            if meta.dtype.startswith("float"):
                values[name] = torch.full(meta.shape, value)
            else:
                values[name] = torch.zeros(meta.shape, dtype=getattr(torch, meta.dtype))
        asyncio.run(job.deliver(TransferKind.FORWARD, 0, 0, 0, values))
    return reporter


def test_a_stage_applies_the_jobs_ceiling_to_what_it_receives(model: CapturedModel) -> None:
    # 2e6 everywhere passes the default ceiling (1e30) ...
    assert _deliver_large(model, spec(), 2e6).reports == []
    # ... and is refused, its sender named, under a job's ceiling of 1e6.
    with pytest.raises(SuspectValue, match=r"\|x\| 2e\+06 >= 1e\+06"):
        _deliver_large(model, spec(values={"ceiling": 1e6}), 2e6)


def test_the_coordinators_recomputation_chains_to_the_models_own_loss(
    model: CapturedModel,
) -> None:
    """Stage by stage with `recompute`, handing each stage's outputs on, the last stage's
    loss is the model's own (PyTorch's) loss on the same batch."""
    m = build_model("gpt", GPT, seed=0)
    batch = example_batch("gpt", GPT, 2)
    with torch.no_grad():
        expected = float(m(**batch))
    cut = partition(model.graph, balanced_assignment(model.graph, 3))
    env: dict[str, Any] = dict(batch)
    loss = None
    for stage in cut.stages:
        params = {n: t for n, t in model.state.items() if n in stage.graph.param_specs}
        inputs = {n: env[n] for n in stage.graph.inputs}
        for n in inputs:
            assert fits(inputs[n], stage.graph.node(n).meta), n
        outputs = recompute(stage, params, inputs)
        env.update(outputs)
        if stage.loss:
            loss = float(outputs[stage.loss])
    assert loss == pytest.approx(expected, rel=1e-6)


def test_what_the_comparison_sees() -> None:
    a = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    assert largest_difference(a, a.clone()) == (0.0, 4.0)
    assert largest_difference(a, a + 0.05)[0] == pytest.approx(0.05)
    assert largest_difference((a, 3), (a * 2, 3))[0] == pytest.approx(4.0)
    nan = a.clone()
    nan[0, 0] = float("nan")
    assert largest_difference(a, nan)[0] != 0.0 and not largest_difference(a, nan)[0] <= 1.0


def test_a_graph_with_dropout_is_not_recomputed() -> None:
    args = {**GPT, "dropout": 0.1}
    m = build_model("gpt", args, seed=0)
    graph = capture(m, example_batch("gpt", args, 2, device="meta"), name="gpt").graph
    assert random_ops(graph)
    plain = build_model("gpt", GPT, seed=0)
    assert random_ops(capture(plain, example_batch("gpt", GPT, 2, device="meta")).graph) == []


def test_the_recomputed_backward_is_autograds_through_the_later_stages(
    model: CapturedModel,
) -> None:
    """The gradients `recompute_step` gives for a middle stage's inputs, seeded with the
    last stage's gradients, are those autograd finds through both stages at once (the loss
    scaled by 1 / micro-batches, as each worker seeds it)."""
    cut = partition(model.graph, balanced_assignment(model.graph, 3))
    first, middle, last = cut.stages
    env: dict[str, Any] = dict(example_batch("gpt", GPT, 2))

    def params(stage: Stage) -> dict[str, torch.Tensor]:
        return {n: t for n, t in model.state.items() if n in stage.graph.param_specs}

    env.update(recompute(first, params(first), {n: env[n] for n in first.graph.inputs}))
    mid_in = {n: env[n] for n in middle.graph.inputs}
    mid_out, _ = recompute_step(middle, params(middle), mid_in, None, 2)
    env.update(mid_out)
    last_in = {n: env[n] for n in last.graph.inputs}
    _, seeds = recompute_step(last, params(last), last_in, {}, 2)
    _, ours = recompute_step(middle, params(middle), mid_in, seeds, 2)
    # The oracle: both stages as one autograd graph.
    leaves = {
        n: v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
        for n, v in mid_in.items()
    }
    through = StageModule(middle.graph, params(middle))(leaves)
    later = {n: through[n] if n in through else env[n] for n in last.graph.inputs}
    loss = StageModule(last.graph, params(last))(later)[last.loss] / 2
    wanted = [n for n, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    assert wanted
    expected = torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
    for n, e in zip(wanted, expected, strict=True):
        got = ours[n]
        if e is None:
            assert got is None or float(got.abs().max()) == 0.0, n
        else:
            assert got is not None and torch.allclose(got, e, rtol=1e-5, atol=1e-7), n
