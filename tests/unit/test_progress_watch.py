"""A running job that makes no step is re-planned, and the worker the stall points at is
backed off."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.capacity import Capacity
from coordinator.exclusions import Exclusions
from coordinator.job_record import Job
from coordinator.progress_watch import ProgressWatch
from coordinator.registry import Registry, WorkerState
from coordinator.store import open_store
from coordinator.worker_client import WorkerCallError

pytestmark = pytest.mark.unit


@dataclass
class PlanStandIn:
    worker_ids: tuple[str, ...]
    start_step: int = 0


@dataclass
class JobStandIn:
    """What the watch reads of a job."""

    plan: PlanStandIn
    job_id: str = "j"
    epoch: int = 1
    steps_done: int = 0


def registry_of(*ids: str) -> Registry:
    registry = Registry(timeout_s=5.0)
    for port, wid in enumerate(ids):
        registry.workers[wid] = WorkerState(
            worker_id=wid, name=wid, address=f"127.0.0.1:{port + 1}", gflops=1.0
        )
    return registry


def as_job(stand_in: JobStandIn) -> Job:
    return stand_in  # type: ignore[return-value]


def test_steps_that_move_keep_the_job_alone_and_a_stall_blames_the_silent_worker() -> None:
    registry = registry_of("a", "b")
    registry.assign(("a", "b"), "j", 1)
    registry.heartbeat("a", ("j", 1, 0, "running"))
    registry.heartbeat("b", ("", 0, 0, "idle"))  # it does not run the stage it was given
    watch = ProgressWatch(registry, timeout_s=10.0)
    job = JobStandIn(PlanStandIn(("a", "b")))
    assert watch.check(as_job(job), now=0.0) is None
    job.steps_done = 1
    assert watch.check(as_job(job), now=9.0) is None  # moved: the clock starts again
    assert watch.check(as_job(job), now=18.0) is None
    stall = watch.check(as_job(job), now=19.5)
    assert stall is not None and stall.blamed == ("b",)
    assert "no step of progress in 10 s" in stall.reason


def test_a_plan_that_never_made_a_step_blames_its_unmeasured_workers(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            registry = registry_of("known", "new")
            registry.exclusions = Exclusions(store)
            registry.capacity = Capacity(store)
            registry.capacity.note("known", "known", 1.0, 0.5e9)
            registry.assign(("known", "new"), "j", 1)
            for wid in ("known", "new"):
                registry.heartbeat(wid, ("j", 1, 0, "running"))
            watch = ProgressWatch(registry, timeout_s=10.0)
            job = as_job(JobStandIn(PlanStandIn(("known", "new"))))
            assert watch.check(job, now=0.0) is None
            watch._seen["j"] = (1, 0, -100.0)  # as if it started long ago
            stall = await watch.stalled(job)
            assert stall is not None and stall.blamed == ("new",)
            assert registry.exclusions.excluded("new") and not registry.exclusions.excluded("known")

    asyncio.run(run())


def test_a_stall_that_points_at_everyone_only_re_plans() -> None:
    registry = registry_of("a", "b")
    watch = ProgressWatch(registry, timeout_s=1.0)
    job = as_job(JobStandIn(PlanStandIn(("a", "b"))))
    watch.check(job, now=0.0)
    stall = watch.check(job, now=2.0)
    assert stall is not None and stall.blamed == ()


def test_every_worker_whose_call_failed_is_backed_off_and_the_first_failure_raised(
    tmp_path: Path,
) -> None:
    async def fails(worker_id: str) -> None:
        raise WorkerCallError(worker_id, f"loading on {worker_id}: UNAVAILABLE", unreachable=True)

    async def answers() -> None:
        await asyncio.sleep(0)

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            registry = registry_of("a", "dead1", "dead2")
            registry.exclusions = Exclusions(store)
            watch = ProgressWatch(registry)
            with pytest.raises(WorkerCallError, match="dead1"):
                await watch.all_answer([answers(), fails("dead1"), fails("dead2")])
            assert [w.worker_id for w in registry.free()] == ["a"]
            assert "could not start a stage" in (registry.exclusions.reason("dead2") or "")

    asyncio.run(run())
