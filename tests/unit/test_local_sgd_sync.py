"""Local SGD without a network: each worker is told the policy and its period, a stage's
replicas exchange only the loss between averaging rounds, leave a round with bitwise the
same mean parameters, refuse shares that are not due, and apply nothing when a member is
silent; with partial local SGD each worker is told its stage's layers and their iterations,
every trainable parameter in one layer."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest
import torch
import yaml

from coordinator.checkpoints import Checkpoints
from coordinator.handover import StageHandover
from coordinator.planning.compute import ComputeModel
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import Plan, WorkerSlot, stage_routes
from coordinator.planning.planner import PlanRequest, make_plan
from coordinator.planning.stage_sync import layer_of, stage_sync_layers
from coordinator.serde import stage_assignment_pb
from opdag.capture import capture
from opdag.errors import CodecError
from opdag.ir import CapturedModel
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages
from worker.replica_sync import LOSS, ReplicaSync, ReplicaSyncError
from worker.serde import StagePlan, stage_plan_from_pb

pytestmark = pytest.mark.unit

GPT = {"layers": 1, "d_model": 16, "heads": 2, "context": 8}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7200 + i}", 10.0) for i in range(4)]
STEPS, PERIOD = 10, 3


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    m = build_model("gpt", GPT, seed=0)
    return capture(m, example_batch("gpt", GPT, 2, device="meta"), name="gpt")


def local_spec() -> JobSpec:
    doc = {
        "name": "local",
        "model": {"zoo": "gpt", "args": GPT},
        "data": {"corpus": "stdlib-text", "batch_size": 8, "micro_batches": 4},
        "steps": STEPS,
        "parallel": {"planner": "even", "stages": 2, "replicas": 2},
        "sync": {"kind": "local-sgd", "period": PERIOD},
    }
    return parse_job_spec(yaml.safe_dump(doc))


def planned(model: CapturedModel) -> tuple[Plan, list[StagePlan]]:
    return planned_stages(model, local_spec(), WORKERS)


def group(
    model: CapturedModel, stage: int
) -> tuple[list[ReplicaSync], list[torch.nn.Parameter], list[int]]:
    """Both members of `stage`'s group, each with one parameter, joined by direct calls;
    the last list counts each member's sends."""
    _, plans = planned(model)
    mine = sorted((sp for sp in plans if sp.stage == stage), key=lambda sp: sp.replica)
    syncs = [ReplicaSync(sp, token="t", tls=None, timeout_s=0.5) for sp in mine]
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in syncs]
    sends = [0, 0]
    for sync, p in zip(syncs, params, strict=True):
        sync.attach([("w", p)], loss=stage == 1)
    return syncs, params, sends


def join(
    syncs: Sequence[ReplicaSync], sends: list[int], mp: pytest.MonkeyPatch, silent: int = -1
) -> None:
    for sync in syncs:

        async def send(
            replica: int,
            step: int,
            own: list[tuple[str, torch.Tensor]],
            src: int = sync.plan.replica,
        ) -> None:
            sends[src] += 1
            if src != silent:
                await syncs[replica].deliver(step, src, own)

        mp.setattr(sync, "_send", send)


def both(
    syncs: Sequence[ReplicaSync],
    params: Sequence[torch.nn.Parameter],
    step: int,
    losses: tuple[float | None, ...],
) -> list[float | None]:
    async def run() -> list[float | None]:
        return list(
            await asyncio.gather(
                *(
                    s.average_parameters(step, [("w", p)], loss)
                    for s, p, loss in zip(syncs, params, losses, strict=True)
                )
            )
        )

    return asyncio.run(run())


def test_each_worker_is_told_local_sgd_and_its_period(model: CapturedModel) -> None:
    plan, plans = planned(model)
    assert "local SGD, parameters averaged every 3 steps" in plan.explanation
    for sp in plans:
        assert (sp.sync_kind, sp.sync_period, sp.local_sgd) == ("local-sgd", PERIOD, True)
        rounds = [k for k in range(STEPS) if sp.averages_parameters_after(k)]
        assert rounds == [2, 5, 8, 9]  # every third step, and the last


def test_between_rounds_only_the_loss_travels_and_parameters_stay_local(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, params, sends = group(model, stage=1)
    join(syncs, sends, monkeypatch)
    before = [p.detach().clone() for p in params]
    assert both(syncs, params, 0, (1.0, 3.0)) == [2.0, 2.0]
    assert sends == [1, 1]
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)
    # Stage 0 computes no loss: between rounds it sends nothing at all.
    syncs0, params0, sends0 = group(model, stage=0)
    join(syncs0, sends0, monkeypatch)
    assert both(syncs0, params0, 0, (None, None)) == [None, None]
    assert sends0 == [0, 0]


def test_a_round_leaves_every_member_with_bitwise_the_same_mean(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, params, sends = group(model, stage=1)
    join(syncs, sends, monkeypatch)
    want = (params[0].detach() + params[1].detach()) / 2
    assert both(syncs, params, 2, (1.0, 2.0)) == [1.5, 1.5]
    assert torch.equal(params[0].detach(), params[1].detach())
    torch.testing.assert_close(params[0].detach(), want)


def test_the_group_refuses_shares_that_are_not_due(model: CapturedModel) -> None:
    syncs, _, _ = group(model, stage=0)
    sync = syncs[0]
    share = [("w", torch.zeros(3, 2))]

    async def refusals() -> None:
        with pytest.raises(CodecError, match="parameters of step 0 are not due"):
            await sync.deliver(0, 1, share)  # no round after step 0, and no loss here
        with pytest.raises(CodecError, match="parameters of step 5 are not due"):
            await sync.deliver(5, 1, share)  # a peer cannot pass the round after step 2
        with pytest.raises(CodecError, match="not one parameter of this stage"):
            await sync.deliver(2, 1, [(LOSS, torch.zeros(1, dtype=torch.float64))])
        await sync.deliver(2, 1, share)
        with pytest.raises(CodecError, match="arrived twice"):
            await sync.deliver(2, 1, share)

    asyncio.run(refusals())


def test_a_silent_member_fails_the_round_and_nothing_is_averaged(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs, params, sends = group(model, stage=0)
    join(syncs, sends, monkeypatch, silent=1)
    before = params[0].detach().clone()
    with pytest.raises(ReplicaSyncError, match=r"no parameters of step 2 from replica\(s\) \[1\]"):
        asyncio.run(syncs[0].average_parameters(2, [("w", params[0])], None))
    assert torch.equal(params[0].detach(), before)


# -- partial local SGD: the per-layer schedule each worker is told ----------------------------


def partial_spec(period: int = 4) -> JobSpec:
    doc = yaml.safe_load(yaml.safe_dump(local_spec().to_dict()))
    doc["sync"] = {"kind": "partial-local-sgd", "period": period}
    return parse_job_spec(yaml.safe_dump(doc))


def test_a_parameter_belongs_to_the_layer_of_its_numbered_prefix() -> None:
    assert layer_of("blocks.3.attn.qkv.weight") == "blocks.3"
    assert layer_of("tok_emb.weight") == "tok_emb"
    assert layer_of("pos") == "pos"


def test_each_stage_is_told_its_layers_each_averaged_once_per_period(
    model: CapturedModel,
) -> None:
    job = partial_spec()
    plan, cut = make_plan(PlanRequest("j", 1, 0, model.graph, job, WORKERS, {}, ComputeModel()))
    assert "partial local SGD, each layer averaged once every 4 steps" in plan.explanation
    assert "stage 1 partial local SGD" in plan.explanation  # the schedule, printed
    routes = stage_routes(cut)
    for stage in cut.stages:
        layers, schedule = stage_sync_layers(stage.graph, 2, 4)
        assert schedule is not None
        handover = StageHandover(
            job_id="j",
            epoch=1,
            stage=stage,
            plan=plan,
            routes=routes[stage.index],
            spec=job,
            fingerprint="",
            start_step=0,
            secret="s" * 32,
            tensors=Checkpoints.stage_tensors("j", stage, model.state),
            sync_layers=layers,
        )
        pb = stage_assignment_pb(handover)
        sp = stage_plan_from_pb(pb)
        assert sp.sync_kind == "partial-local-sgd" and len(sp.sync_layers) == len(layers)
        trainable = sorted(p.name for p in stage.graph.params if p.trainable)
        assert sorted(p for la in sp.sync_layers for p in la.params) == trainable
        for k in range(4):  # each layer's scheduled iteration comes once in the period
            at = [la.name for la in sp.layers_averaged_after(k) if la.iterations[0] == k]
            assert at == [la.name for la in layers if schedule.iteration_of(la.name) == k]
        assert sp.averaged_after(9, trainable) == set(trainable)  # the last step: all
        del pb.sync_layers[0].params[0]
        with pytest.raises(CodecError, match="every trainable parameter of the stage once"):
            stage_plan_from_pb(pb)


@pytest.mark.parametrize("kind", ["sync", "local-sgd"])
def test_with_fp16_values_the_group_sends_fp16_and_applies_the_same_fp32_mean(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    _, plans = planned(model)
    mine = sorted((sp for sp in plans if sp.stage == 0), key=lambda sp: sp.replica)
    mine = [dataclasses.replace(sp, sync_kind=kind, sync_values="fp16") for sp in mine]
    syncs = [ReplicaSync(sp, token="t", tls=None, timeout_s=0.5) for sp in mine]
    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in syncs]
    grads = [torch.randn(3, 2) for _ in syncs]
    for sync, p, g in zip(syncs, params, grads, strict=True):
        sync.attach([("w", p)], loss=False)
        p.grad = g
    join(syncs, [0, 0], monkeypatch)
    sent: list[torch.dtype] = []
    real = syncs[1].deliver

    async def spy(step: int, src: int, tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        sent.extend(t.dtype for _, t in tensors)
        await real(step, src, tensors)

    monkeypatch.setattr(syncs[1], "deliver", spy)
    values = grads if kind == "sync" else [p.detach().clone() for p in params]
    want = (values[0].half().float() + values[1].half()) / 2

    async def run() -> None:
        pairs = zip(syncs, params, strict=True)
        if kind == "sync":
            await asyncio.gather(*(s.average(2, [("w", p)], None) for s, p in pairs))
        else:
            await asyncio.gather(*(s.average_parameters(2, [("w", p)], None) for s, p in pairs))

    asyncio.run(run())
    assert sent == [torch.float16]
    got = [p.grad if kind == "sync" else p.detach() for p in params]
    assert got[0] is not None and got[1] is not None
    assert torch.equal(got[0], got[1]) and got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want, rtol=0, atol=0)


def test_a_worker_runs_an_outer_optimizer_only_of_a_local_kind_and_in_range(
    model: CapturedModel,
) -> None:
    _, plans = planned(model)
    sp = plans[0]
    assert dataclasses.replace(sp, outer=("nesterov", 0.7, 0.9)).sync_problem() is None
    bad = [
        (dataclasses.replace(sp, sync_kind="sync", outer=("sgd", 0.7, 0.9)), "not one of"),
        (dataclasses.replace(sp, outer=("adam", 0.7, 0.9)), "not one of"),
        (dataclasses.replace(sp, outer=("sgd", 0.0, 0.9)), "out of range"),
        (dataclasses.replace(sp, outer=("sgd", 0.7, 1.0)), "out of range"),
        (dataclasses.replace(sp, sync_values="int8"), "not fp32 or fp16"),
    ]
    for plan, why in bad:
        problem = plan.sync_problem()
        assert problem is not None and why in problem, problem
