"""Link figures are believed only as both ends measured them, and every pair of a large
swarm's idle workers comes round to be measured."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from coordinator.capacity import Capacity
from coordinator.events import CLUSTER, EventLog
from coordinator.exclusions import Exclusions
from coordinator.link_survey import MAX_PROBED_WORKERS, LinkProber
from coordinator.planning.links import MAX_BELIEVED_BANDWIDTH_BPS, cross_checked
from coordinator.registry import Registry, WorkerState
from coordinator.store import open_store
from coordinator.worker_client import WorkerCallError, WorkerClient

pytestmark = pytest.mark.unit

GBIT = 1e9 / 8


def test_a_pair_is_believed_at_the_slower_end_and_only_when_both_ends_measured() -> None:
    measured = {
        ("a", "b"): (10 * GBIT, 0.001),
        ("b", "a"): (1 * GBIT, 0.004),
        ("a", "c"): (5 * GBIT, 0.001),  # c never measured its way back
    }
    assert cross_checked(measured) == {
        ("a", "b"): (1 * GBIT, 0.004),
        ("b", "a"): (1 * GBIT, 0.004),
    }


def test_a_79_tbit_report_is_not_believed() -> None:
    fake = 79e12 / 8
    assert fake > MAX_BELIEVED_BANDWIDTH_BPS
    measured = {("fake", "real"): (fake, 0.0), ("real", "fake"): (1 * GBIT, 0.001)}
    assert cross_checked(measured) == {}
    # Below the bound, the honest end's figure bounds it.
    measured[("fake", "real")] = (0.99 * MAX_BELIEVED_BANDWIDTH_BPS, 0.0)
    assert cross_checked(measured)[("fake", "real")] == (1 * GBIT, 0.001)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        measured[("fake", "real")] = (bad, 0.0)
        assert cross_checked(measured) == {}


def test_every_pair_of_hundreds_of_idle_workers_is_considered_in_turn(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        registry = Registry(timeout_s=5.0)
        n = 3 * MAX_PROBED_WORKERS + 5
        for i in range(n):
            registry.workers[f"w{i:03d}"] = WorkerState(
                worker_id=f"w{i:03d}", name=f"w{i}", address=f"127.0.0.1:{1000 + i}", gflops=1.0
            )
        prober = LinkProber(registry, WorkerClient(token="t", tls=None), store)
        covered: set[tuple[str, str]] = set()
        blocks = -(-n // (MAX_PROBED_WORKERS // 2))
        for _ in range(blocks * (blocks - 1) // 2):
            wanted = prober._wanted()
            considered = {w for pair in wanted for w in pair}
            assert len(considered) <= MAX_PROBED_WORKERS
            covered.update(wanted)
        ids = [f"w{i:03d}" for i in range(n)]
        assert covered == set(itertools.permutations(ids, 2))


class LyingClient(WorkerClient):
    """A worker client whose every measured link comes back at 79 Tbit/s."""

    async def measure_link(self, *args: object, **kwargs: object) -> tuple[float, float, str]:
        return 79e12 / 8, 1e-5, ""


def test_a_79_tbit_report_is_refused_and_its_reporter_backed_off(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            registry = Registry(timeout_s=5.0)
            registry.exclusions = Exclusions(store, EventLog(store))
            for port, wid in enumerate(("liar", "honest")):
                registry.workers[wid] = WorkerState(
                    worker_id=wid, name=wid, address=f"127.0.0.1:{port + 1}", gflops=1.0
                )
            prober = LinkProber(registry, LyingClient(token="t", tls=None), store)
            await prober._measure("liar", "honest")
            record = prober.links[("liar", "honest")]
            assert record.bandwidth == 0.0 and "implausible" in record.error
            assert prober.figures(["liar", "honest"]) == {}
            assert registry.exclusions.excluded("liar")
            assert "implausible figure 7.9e+13 bit/s" in (registry.exclusions.reason("liar") or "")
            assert [w.worker_id for w in registry.free()] == ["honest"]
            [event] = await EventLog(store).since(CLUSTER)
            assert event["kind"] == "excluded" and event["worker_id"] == "liar"

    asyncio.run(run())


class DeadOrAlive(WorkerClient):
    """A worker client that reaches every worker but the one named "dead"."""

    async def measure_link(
        self, worker_id: str, address: str, *args: object, **kwargs: object
    ) -> tuple[float, float, str]:
        if worker_id == "dead":
            raise WorkerCallError(worker_id, "UNAVAILABLE: connection refused", unreachable=True)
        return 1e9, 1e-4, ""


def test_a_worker_is_planned_only_once_reached_and_backed_off_if_never(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            registry = Registry(timeout_s=5.0)
            registry.exclusions = Exclusions(store, EventLog(store))
            registry.capacity = Capacity(store)
            registry.capacity.require_reached = True
            for port, wid in enumerate(("live", "dead")):
                registry.workers[wid] = WorkerState(
                    worker_id=wid, name=wid, address=f"127.0.0.1:{port + 1}", gflops=1.0
                )
            prober = LinkProber(registry, DeadOrAlive(token="t", tls=None), store)
            assert registry.free() == []  # nobody reached yet
            await prober._reach("live", "127.0.0.1:1")
            await prober._reach("dead", "127.0.0.1:2")
            assert [w.worker_id for w in registry.free()] == ["live"]
            assert not registry.exclusions.excluded("dead")  # one failure: tried again
            await prober._reach("dead", "127.0.0.1:2")
            assert registry.exclusions.excluded("dead")
            assert "unreachable at 127.0.0.1:2" in (registry.exclusions.reason("dead") or "")
            # A worker that moves is reached again at its new address before it is planned.
            registry.workers["live"].address = "127.0.0.1:3"
            assert registry.free() == []

    asyncio.run(run())
