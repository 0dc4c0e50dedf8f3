"""Plans of stages x replicas, without a network: the planner places R pipelines, the plan
records each placement's replica and prints the sync groups, each worker is told its
replica, its own pipeline's peers and its group's; a stage's replicas average their
gradients to the same values, and refuse what does not belong to the group."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import torch
import yaml

from coordinator.planning.compute import ComputeModel
from coordinator.planning.jobspec import JobSpec, JobSpecError, parse_job_spec
from coordinator.planning.plan import Plan, WorkerSlot
from coordinator.planning.planner import PlanRequest, make_plan, predict
from opdag.capture import capture
from opdag.errors import CodecError
from opdag.ir import CapturedModel
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages
from worker.replica_sync import LOSS, ReplicaSync, ReplicaSyncError
from worker.serde import StagePlan

pytestmark = pytest.mark.unit

GPT = {"layers": 2, "d_model": 32, "heads": 2, "context": 16}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7100 + i}", 10.0) for i in range(5)]


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    m = build_model("gpt", GPT, seed=0)
    return capture(m, example_batch("gpt", GPT, 2, device="meta"), name="gpt")


def spec(planner: str = "even", replicas: object = 2, micro_batches: int = 4) -> JobSpec:
    data = {
        "corpus": "stdlib-text",
        "batch_size": 4 * micro_batches,
        "micro_batches": micro_batches,
    }
    doc = {
        "name": "replicas",
        "model": {"zoo": "gpt", "args": GPT},
        "data": data,
        "steps": 10,
        "parallel": {"planner": planner, "stages": 2, "replicas": replicas},
    }
    return parse_job_spec(yaml.safe_dump(doc))


def planned(model: CapturedModel, job: JobSpec) -> tuple[Plan, list[StagePlan]]:
    return planned_stages(model, job, WORKERS)


@pytest.mark.parametrize("planner", ["even", "opfence"])
def test_two_replicas_of_two_stages_are_two_pipelines_on_four_workers(
    model: CapturedModel, planner: str
) -> None:
    plan, _ = planned(model, spec(planner))
    assert (plan.num_stages, plan.replicas, len(plan.placements)) == (2, 2, 4)
    rows = plan.pipelines()
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    assert len({w for r in rows for w in r}) == 4
    if planner == "even":
        assert rows == (("w0", "w1"), ("w2", "w3"))
    assert "sync groups" in plan.explanation
    assert Plan.from_dict(plan.to_dict()) == plan
    assert predict(
        plan, model.graph, spec(planner), {w.worker_id: 10.0 for w in WORKERS}, {}, ComputeModel()
    ) == pytest.approx(plan.predicted_step_s)


def test_each_worker_is_told_its_replica_its_pipeline_and_its_sync_group(
    model: CapturedModel,
) -> None:
    plan, plans = planned(model, spec())
    address = {(p.replica, p.stage): p.address for p in plan.placements}
    for sp in plans:
        assert sp.replicas == 2 and sp.local_micro_batches == 2
        other = 1 - sp.stage
        assert dict(sp.peers) == {other: address[(sp.replica, other)]}
        assert dict(sp.sync_peers) == {1 - sp.replica: address[(1 - sp.replica, sp.stage)]}


def test_a_plan_stored_before_replicas_reads_as_one_pipeline(model: CapturedModel) -> None:
    plan, _ = planned(model, spec(replicas=1))
    old = plan.to_dict()
    for p in old["placements"]:
        del p["replica"]
    again = Plan.from_dict(old)
    assert again.replicas == 1 and again.num_stages == 2
    assert "sync groups" not in plan.explanation


def test_replica_counts_always_split_the_micro_batches(model: CapturedModel) -> None:
    # A count given in the spec is checked there; `auto` lets the planner pick only counts
    # whose shares are equal.
    with pytest.raises(JobSpecError, match="3 micro-batches do not split evenly over 2"):
        spec(micro_batches=3)
    for planner in ("even", "opfence"):
        plan, _ = make_plan(
            PlanRequest(
                "j", 1, 0, model.graph, spec(planner, "auto", 3), WORKERS, {}, ComputeModel()
            )
        )
        assert 3 % plan.replicas == 0, (planner, plan.replicas)


# -- the sync group's averaging, its two members joined by direct calls ----------------------


def group(model: CapturedModel, stage: int) -> tuple[list[ReplicaSync], list[torch.nn.Parameter]]:
    _, plans = planned(model, spec())
    mine = [sp for sp in plans if sp.stage == stage]
    syncs = [ReplicaSync(sp, token="t", tls=None, timeout_s=0.5) for sp in mine]
    params = [torch.nn.Parameter(torch.zeros(3, 2)) for _ in syncs]
    for sync, p in zip(syncs, params, strict=True):
        sync.attach([("w", p)], loss=stage == 1)
    return syncs, params


def join(
    syncs: Sequence[ReplicaSync], monkeypatch: pytest.MonkeyPatch, *, silent: int = -1
) -> None:
    """Each member's sends delivered straight to the other (none from `silent`)."""
    for sync in syncs:

        async def send(
            replica: int,
            step: int,
            own: list[tuple[str, torch.Tensor]],
            src: int = sync.plan.replica,
        ) -> None:
            if src != silent:
                await syncs[replica].deliver(step, src, own)

        monkeypatch.setattr(sync, "_send", send)


def test_the_replicas_of_a_stage_apply_the_same_mean_gradient_and_loss(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, params = group(model, stage=1)
    join(syncs, monkeypatch)
    grads = [torch.randn(3, 2), torch.randn(3, 2)]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()

    async def both() -> list[float | None]:
        return list(
            await asyncio.gather(
                *(
                    s.average(0, [("w", p)], loss)
                    for s, p, loss in zip(syncs, params, (1.0, 3.0), strict=True)
                )
            )
        )

    losses = asyncio.run(both())
    assert losses == [2.0, 2.0]
    want = (grads[0] + grads[1]) / 2
    assert params[0].grad is not None and params[1].grad is not None
    assert torch.equal(params[0].grad, params[1].grad)
    torch.testing.assert_close(params[0].grad, want)


def test_a_silent_replica_fails_the_step_and_nothing_is_averaged(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, params = group(model, stage=0)
    join(syncs, monkeypatch, silent=1)
    params[0].grad = torch.ones(3, 2)
    with pytest.raises(ReplicaSyncError, match=r"no gradients of step 0 from replica\(s\) \[1\]"):
        asyncio.run(syncs[0].average(0, [("w", params[0])], None))
    assert torch.equal(params[0].grad, torch.ones(3, 2))


def test_the_group_refuses_gradients_that_are_not_its_own(model: CapturedModel) -> None:
    syncs, _ = group(model, stage=1)
    sync = syncs[0]
    good = [("w", torch.zeros(3, 2)), (LOSS, torch.zeros(1, dtype=torch.float64))]

    async def refusals() -> None:
        with pytest.raises(CodecError, match="replica 0 is not in this stage's sync group"):
            await sync.deliver(0, 0, good)
        with pytest.raises(CodecError, match="not due"):
            await sync.deliver(5, 1, good)
        with pytest.raises(CodecError, match="not one gradient of this stage"):
            await sync.deliver(0, 1, [("other", torch.zeros(3, 2))])
        with pytest.raises(CodecError, match=r"expected torch.float32\[3, 2\]"):
            await sync.deliver(0, 1, [("w", torch.zeros(2, 3))])
        await sync.deliver(0, 1, good)
        with pytest.raises(CodecError, match="arrived twice"):
            await sync.deliver(0, 1, good)

    asyncio.run(refusals())


# -- what OP-Fence picks, priced by the job's sync policy -----------------------------------

GPT_6X256 = {"layers": 6, "d_model": 256, "heads": 8, "context": 128}


@pytest.fixture(scope="module")
def gpt_6x256() -> CapturedModel:
    m = build_model("gpt", GPT_6X256, seed=0)
    return capture(m, example_batch("gpt", GPT_6X256, 8, device="meta"), name="gpt")


def _two_hosts_plan(model: CapturedModel, sync: object) -> Plan:
    doc = {
        "name": "two-hosts",
        "model": {"zoo": "gpt", "args": GPT_6X256},
        "data": {"corpus": "stdlib-text", "batch_size": 32, "micro_batches": 4},
        "steps": 100,
        "parallel": {"planner": "opfence", "replicas": "auto"},
        "sync": sync,
    }
    hosts = [WorkerSlot(w, w, f"10.0.0.{i + 1}:7100", 10.0) for i, w in enumerate("ab")]
    ten_mbit = (10e6 / 8, 0.002)
    figures = {("a", "b"): ten_mbit, ("b", "a"): ten_mbit}
    job = parse_job_spec(yaml.safe_dump(doc))
    plan, _ = make_plan(PlanRequest("j", 1, 0, model.graph, job, hosts, figures, ComputeModel()))
    return plan


def test_two_hosts_on_a_slow_link_become_two_replicas_only_when_averaging_is_rare(
    gpt_6x256: CapturedModel,
) -> None:
    # 4.9 M parameters: `sync` sends 19.6 MB of gradients each way every step, 16 s at
    # 10 Mbit/s, far more than the pipeline's activations or one host alone; local SGD
    # sends the fp16 parameters (9.8 MB, 8 s) once every 32 steps, 0.25 s a step, so two
    # replicas of the whole model beat both.
    exact = _two_hosts_plan(gpt_6x256, "sync")
    assert exact.replicas == 1
    local = _two_hosts_plan(gpt_6x256, {"kind": "local-sgd", "period": 32, "values": "fp16"})
    assert (local.num_stages, local.replicas) == (1, 2)
    assert {w for r in local.pipelines() for w in r} == {"a", "b"}
    assert local.predicted_step_s < exact.predicted_step_s
    assert "replica averaging per stage, all-to-all" in local.explanation
    # Every step instead, the same bytes cost more than the second host gains.
    every = _two_hosts_plan(gpt_6x256, {"kind": "local-sgd", "period": 1, "values": "fp16"})
    assert every.replicas == 1


def test_local_sgd_keeps_pipelines_in_a_region_and_sync_keeps_its_groups_there(
    gpt_6x256: CapturedModel,
) -> None:
    # Two regions of two hosts, 200 Mbit/s inside, 20 Mbit/s between. Averaging every
    # step wants its sync groups inside a region (pipelines cross); averaging once in 32
    # steps sends little, so the replicas spread along lanes across the regions and each
    # pipeline stays inside one.
    region = {"eu1": "eu", "us1": "us", "eu2": "eu", "us2": "us"}
    hosts = [WorkerSlot(w, w, f"10.0.0.{i + 1}:7100", 10.0) for i, w in enumerate(region)]
    figures = {
        (a, b): ((200e6 if region[a] == region[b] else 20e6) / 8, 0.002)
        for a in region
        for b in region
        if a != b
    }

    def planned_with(sync: object) -> Plan:
        doc = {
            "name": "two-regions",
            "model": {"zoo": "gpt", "args": GPT_6X256},
            "data": {"corpus": "stdlib-text", "batch_size": 32, "micro_batches": 8},
            "steps": 100,
            "parallel": {"planner": "opfence", "replicas": "auto"},
            "sync": sync,
        }
        job = parse_job_spec(yaml.safe_dump(doc))
        req = PlanRequest("j", 1, 0, gpt_6x256.graph, job, hosts, figures, ComputeModel())
        return make_plan(req)[0]

    exact = planned_with("sync")
    assert exact.replicas > 1
    for s in range(exact.num_stages):
        assert len({region[p.worker_id] for p in exact.placements if p.stage == s}) == 1
    local = planned_with({"kind": "local-sgd", "period": 32, "values": "fp16"})
    assert local.replicas > 1
    for row in local.pipelines():
        assert len({region[w] for w in row}) == 1
    assert local.predicted_step_s < exact.predicted_step_s
