"""The elastic rules without a network: a member told it is alone completes the round in
progress with the shares that arrived and says how many; a failed send waits for that word
instead of failing the step; the coordinator keeps replica 0 when it is intact, else the
lowest intact one; only the kept replica's reports count; growth drains at a boundary no
stage can have passed that ends an averaging period."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
import yaml

from coordinator.elastic import ElasticReplicas, next_boundary
from coordinator.job_record import Job
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import WorkerSlot
from coordinator.registry import Registry, WorkerState
from coordinator.states import JobState, WorkerStatus
from opdag.capture import capture
from opdag.errors import OpDagError
from opdag.ir import CapturedModel
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages
from worker.replica_sync import ReplicaSync, ReplicaSyncError

pytestmark = pytest.mark.unit

GPT = {"layers": 1, "d_model": 16, "heads": 2, "context": 8}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7300 + i}", 10.0) for i in range(4)]


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    m = build_model("gpt", GPT, seed=0)
    return capture(m, example_batch("gpt", GPT, 2, device="meta"), name="gpt")


def spec(sync: dict[str, object], steps: int = 40) -> JobSpec:
    doc = {
        "name": "elastic",
        "model": {"zoo": "gpt", "args": GPT},
        "data": {"corpus": "stdlib-text", "batch_size": 8, "micro_batches": 4},
        "steps": steps,
        "parallel": {"planner": "even", "stages": 2, "replicas": 2},
        "sync": sync,
    }
    return parse_job_spec(yaml.safe_dump(doc))


def member(model: CapturedModel, stage: int, replica: int, timeout_s: float) -> ReplicaSync:
    _, plans = planned_stages(model, spec({"kind": "sync"}), WORKERS)
    sp = next(p for p in plans if p.stage == stage and p.replica == replica)
    return ReplicaSync(sp, token="t", tls=None, timeout_s=timeout_s)


def test_alone_a_round_completes_with_the_shares_that_arrived_and_says_so(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = member(model, stage=0, replica=0, timeout_s=30.0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    sync.attach([("w", p)], loss=False)

    async def unreachable(replica: int, step: int, own: object) -> None:
        raise ReplicaSyncError(f"replica {replica} unreachable")

    monkeypatch.setattr(sync, "_send", unreachable)

    async def run() -> tuple[float | None, tuple[int, float, int, int]]:
        task = asyncio.create_task(sync.average(0, [("w", p)], None))
        await asyncio.sleep(0.2)
        assert not task.done(), "a failed send must wait for the coordinator's word"
        sync.go_alone()
        loss = await asyncio.wait_for(task, 5)
        return loss, sync.take_figures(0)

    loss, (_, seconds, shares, _) = asyncio.run(run())
    assert loss is None and shares == 1 and seconds > 0.1
    assert torch.equal(p.grad, torch.full((3,), 2.0))  # its own gradients: nothing else came


def test_without_the_word_a_silent_member_still_fails_the_step(
    model: CapturedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = member(model, stage=0, replica=0, timeout_s=0.3)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    sync.attach([("w", p)], loss=False)

    async def delivered(replica: int, step: int, own: object) -> None:
        return None  # taken, but the other member never sends its own

    monkeypatch.setattr(sync, "_send", delivered)
    with pytest.raises(ReplicaSyncError, match="no gradients of step 0 from replica"):
        asyncio.run(sync.average(0, [("w", p)], None))
    assert torch.equal(p.grad, torch.full((3,), 2.0))


def test_alone_a_member_refuses_shares_and_averages_with_nobody(
    model: CapturedModel,
) -> None:
    sync = member(model, stage=1, replica=0, timeout_s=30.0)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    sync.attach([("w", p)], loss=True)

    async def run() -> float | None:
        sync.go_alone()
        with pytest.raises(Exception, match="averages alone"):
            await sync.deliver(0, 1, [("w", torch.zeros(3))])
        return await sync.average(0, [("w", p)], 2.5)

    assert asyncio.run(run()) == 2.5
    assert sync.take_figures(0)[2] == 1


def job_on(model: CapturedModel, registry: Registry, sync: dict[str, object]) -> Job:
    job_spec = spec(sync)
    plan, _ = planned_stages(model, job_spec, WORKERS)
    job = Job(job_id="j", name="elastic", spec=job_spec, epoch=1, plan=plan)
    for w in WORKERS:
        registry.workers[w.worker_id] = WorkerState(
            worker_id=w.worker_id, name=w.name, address=w.address, last_seen=time.monotonic()
        )
    registry.assign(plan.worker_ids, "j", 1)
    return job


class Lifecycle:
    """What `ElasticReplicas.kept_replica` reads of the life cycle: the registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry


def test_the_kept_replica_is_replica_0_when_intact_else_the_lowest_intact(
    model: CapturedModel,
) -> None:
    registry = Registry(timeout_s=5.0)
    job = job_on(model, registry, {"kind": "sync"})
    elastic = ElasticReplicas(Lifecycle(registry), drain_timeout_s=60)  # type: ignore[arg-type]
    assert job.plan is not None
    by_replica = {r: [p.worker_id for p in job.plan.placements if p.replica == r] for r in (0, 1)}
    assert elastic.kept_replica(job) == 0
    lost = registry.workers[by_replica[1][1]]
    lost.state = WorkerStatus.LOST
    assert elastic.kept_replica(job) == 0
    lost.state = WorkerStatus.BUSY
    registry.workers[by_replica[0][0]].state = WorkerStatus.LOST
    assert elastic.kept_replica(job) == 1
    lost.state = WorkerStatus.LOST  # both replicas broken: back to the checkpoint
    assert elastic.kept_replica(job) is None


def test_once_alone_only_the_kept_replicas_reports_count(model: CapturedModel) -> None:
    registry = Registry(timeout_s=5.0)
    job = job_on(model, registry, {"kind": "sync"})
    assert job.plan is not None
    r0 = [p.worker_id for p in job.plan.placements if p.replica == 0]
    r1 = [p.worker_id for p in job.plan.placements if p.replica == 1]
    assert all(job.speaks(w) and not job.dropped(w) for w in r0)
    assert all(not job.speaks(w) and not job.dropped(w) for w in r1)
    assert job.dropped("a worker outside the plan")
    job.speaker, job.alone = 1, True
    assert all(job.speaks(w) and not job.dropped(w) for w in r1)
    assert all(job.dropped(w) for w in r0)


@pytest.mark.parametrize(
    ("sync", "steps_done", "boundary"),
    [
        ({"kind": "sync"}, 10, 13),
        ({"kind": "local-sgd", "period": 8}, 10, 16),
        ({"kind": "local-sgd", "period": 8}, 13, 16),
        ({"kind": "local-sgd", "period": 8}, 14, 24),
        ({"kind": "partial-local-sgd", "period": 4}, 0, 4),
    ],
)
def test_growth_drains_at_a_period_boundary_no_stage_can_have_passed(
    model: CapturedModel, sync: dict[str, object], steps_done: int, boundary: int
) -> None:
    job = Job(job_id="j", name="elastic", spec=spec(sync), steps_done=steps_done)
    assert next_boundary(job) == boundary


def outer_member(model: CapturedModel) -> ReplicaSync:
    sync = {"kind": "local-sgd", "period": 2, "outer": {"name": "nesterov"}}
    _, plans = planned_stages(model, spec(sync), WORKERS)
    return ReplicaSync(plans[0], token="t", tls=None)


def test_the_outer_state_goes_into_a_checkpoint_and_comes_back_checked(
    model: CapturedModel,
) -> None:
    p = torch.nn.Parameter(torch.ones(3))
    sync = outer_member(model)
    sync.attach([("w", p)], loss=False)
    state = sync.outer_state()
    assert sorted(state) == ["optim/w/outer_anchor", "optim/w/outer_velocity"]
    state["optim/w/outer_velocity"] = torch.full((3,), 0.5)
    again = outer_member(model)
    again.attach([("w", p)], loss=False, outer=state)
    assert torch.equal(again.outer_state()["optim/w/outer_velocity"], torch.full((3,), 0.5))
    bad = [
        ({"optim/w/outer_anchor": torch.ones(3)}, "does not fit the stage"),
        ({**state, "optim/w/outer_anchor": torch.ones(4)}, "shaped"),
        ({**state, "optim/w/outer_anchor": torch.ones(3, dtype=torch.int64)}, "not a float"),
        ({**state, "optim/w/outer_velocity": torch.tensor([1.0, float("nan"), 0.0])}, "finite"),
    ]
    for tensors, message in bad:
        with pytest.raises(OpDagError, match=message):
            outer_member(model).attach([("w", p)], loss=False, outer=tensors)


class Recorder(Lifecycle):
    """A life cycle that notes the re-plans asked of it."""

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.recovered: list[str] = []

    async def recover(self, job: Job, reason: str) -> None:
        self.recovered.append(reason)


def test_a_second_loss_in_a_replica_already_let_go_changes_nothing(model: CapturedModel) -> None:
    registry = Registry(timeout_s=5.0)
    job = job_on(model, registry, {"kind": "sync"})
    life = Recorder(registry)
    elastic = ElasticReplicas(life, drain_timeout_s=60)  # type: ignore[arg-type]
    assert job.plan is not None
    r0 = [p.worker_id for p in job.plan.placements if p.replica == 0]
    r1 = [p.worker_id for p in job.plan.placements if p.replica == 1]
    job.state, job.speaker, job.alone = JobState.RUNNING, 0, True  # replica 1 was let go
    asyncio.run(elastic.lose(job, registry.workers[r1[0]]))
    assert life.recovered == []
    asyncio.run(elastic.lose(job, registry.workers[r0[0]]))  # the kept one: start over
    assert life.recovered == [f"worker {registry.workers[r0[0]].name} was lost"]
