"""The rules of excluding a worker from planning, on a real (SQLite) store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from coordinator.capacity import UNMEASURED_GFLOPS, Capacity
from coordinator.dashboard.snapshots import Snapshots
from coordinator.events import CLUSTER, EventLog
from coordinator.exclusions import Exclusions
from coordinator.registry import Registry, WorkerState
from coordinator.store import open_store
from tests.unit.test_dashboard_snapshots import small_cluster

pytestmark = pytest.mark.unit


def test_an_excluded_worker_is_left_out_until_its_back_off_ends(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store, EventLog(store), backoff_s=10.0)
            registry = Registry(timeout_s=5.0)
            registry.exclusions = ex
            for name in ("a", "b"):
                registry.workers[name] = WorkerState(
                    worker_id=name, name=name, address="127.0.0.1:1", gflops=1.0
                )
            seconds = await ex.back_off("a", "a", reason="LoadStage failed: UNAVAILABLE")
            assert seconds == 10.0
            assert ex.excluded("a") and not ex.excluded("b")
            assert ex.reason("a") == "LoadStage failed: UNAVAILABLE" and ex.reason("b") is None
            assert [w.worker_id for w in registry.free()] == ["b"]
            later = time.time() + 11
            assert not ex.excluded("a", now=later)
            [row] = ex.rows()
            assert row["worker_id"] == "a" and not row["for_good"]
            assert 9 < row["remaining_s"] <= 10
            [event] = await EventLog(store).since(CLUSTER)
            assert event["kind"] == "excluded" and event["worker_id"] == "a"
            assert "excluded for 10 s: LoadStage failed" in event["text"]

    asyncio.run(run())


def test_each_repeat_offence_doubles_the_back_off_up_to_the_cap(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store, backoff_s=1.0, max_backoff_s=5.0)
            got = []
            for _ in range(5):
                got.append(ex.next_backoff_s("w"))
                # An offence after the back-off ran out (a back-off still in force and
                # longer than a new one would be is left alone).
                await ex.exclude("w", "w", reason="no progress", until=time.time() - 1)
            assert got == [1.0, 2.0, 4.0, 5.0, 5.0]
            await ex.lift("w")
            assert ex.next_backoff_s("w") == 1.0 and store.list_exclusions() == []

    asyncio.run(run())


def test_a_quarantine_is_for_good_and_never_shortened(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store, EventLog(store))
            await ex.exclude("w", "w", reason="sent NaN gradients", until=None)
            await ex.back_off("w", "w", reason="no progress")
            assert ex.excluded("w", now=time.time() + 1e9)
            assert ex.reason("w") == "sent NaN gradients"
            assert ex.rows()[0]["for_good"] and ex.rows()[0]["until"] is None
            kinds = [e["kind"] for e in await EventLog(store).since(CLUSTER)]
            assert kinds == ["quarantined"]

    asyncio.run(run())


def test_a_restarted_coordinator_keeps_the_exclusions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"

    async def run() -> None:
        with open_store(url) as store:
            ex = Exclusions(store)
            await ex.exclude("q", "q", reason="bad values", until=None)
            await ex.back_off("b", "b", reason="unreachable")
        with open_store(url) as store:
            again = Exclusions(store)
            await again.load()
            assert again.excluded("q") and again.excluded("b")
            assert again.reason("b") == "unreachable"
            # The offence count survives too: the next back-off is twice as long.
            assert again.next_backoff_s("b") == 2 * again.backoff_s

    asyncio.run(run())


def test_a_back_off_must_be_positive_and_below_its_cap(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
        with pytest.raises(ValueError, match="back-off"):
            Exclusions(store, backoff_s=0.0)
        with pytest.raises(ValueError, match="back-off"):
            Exclusions(store, backoff_s=10.0, max_backoff_s=1.0)


def test_a_backed_off_address_stays_out_under_a_new_worker_id(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store)
            registry = Registry(timeout_s=5.0)
            registry.exclusions = ex
            await ex.back_off("old", "ghost", reason="unreachable", address="127.0.0.1:9")
            for wid, address in (("new", "127.0.0.1:9"), ("other", "127.0.0.1:10")):
                registry.workers[wid] = WorkerState(
                    worker_id=wid, name=wid, address=address, gflops=1.0
                )
            assert [w.worker_id for w in registry.free()] == ["other"]
            again = Exclusions(store)
            await again.load()
            assert again.excluded_address("127.0.0.1:9")
            assert not again.excluded_address("127.0.0.1:10")

    asyncio.run(run())


def test_failures_while_already_backed_off_are_one_offence(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store, EventLog(store), backoff_s=10.0)
            first = await ex.back_off("w", "w", reason="unreachable")
            again = await ex.back_off("w", "w", reason="unreachable")
            assert first == 10.0 and 9 < again <= 10.0
            assert ex.next_backoff_s("w") == 20.0
            assert len(await EventLog(store).since(CLUSTER)) == 1

    asyncio.run(run())


def test_the_dashboard_shows_an_excluded_worker_with_its_reason() -> None:
    async def run() -> None:
        c = await small_cluster()
        c.registry.exclusions = Exclusions(c.store)
        c.registry.capacity = Capacity(c.store)
        w3 = next(w for w in c.workers if w.name == "w3")
        await c.registry.exclusions.back_off(w3.worker_id, "w3", reason="unreachable")
        view = await Snapshots(manager=c.manager, registry=c.registry, links=c.links).workers()
        rows = {r["name"]: r for r in view["workers"]}
        assert rows["w3"]["state"] == "excluded" and rows["w3"]["excluded"] == "unreachable"
        assert rows["w2"]["state"] == "busy" and "excluded" not in rows["w2"]
        # Nothing is measured yet: every worker is planned at the low default, not its claim.
        assert rows["w2"]["gflops"] == 12.0 and rows["w2"]["planned_gflops"] == UNMEASURED_GFLOPS

    asyncio.run(run())


def test_a_worker_back_at_a_new_address_ends_only_its_unreachable_back_off(tmp_path: Path) -> None:
    from coordinator.exclusions import UNREACHABLE_REASON

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            ex = Exclusions(store, EventLog(store), backoff_s=10.0)
            old, new = "127.0.0.1:7001", "127.0.0.1:7002"
            reason = f"{UNREACHABLE_REASON}{old}: UNAVAILABLE"
            await ex.back_off("a", "a", reason=reason, address=old)
            assert not await ex.moved("a", old)  # the same address: nothing has changed
            assert ex.excluded("a")
            assert await ex.moved("a", new)
            assert not ex.excluded("a") and ex.excluded_address(old)  # the old one stays out
            assert ex.next_backoff_s("a") == 20.0  # the offence still counts
            # A coordinator that takes over keeps the worker's record: not excluded, its
            # offence counted (the old address's exclusion was this process's only).
            again = Exclusions(store, EventLog(store), backoff_s=10.0)
            await again.load()
            assert not again.excluded("a") and again.next_backoff_s("a") == 20.0
            # Neither a stall's back-off nor a quarantine ends by moving.
            await ex.back_off("b", "b", reason="job j: no step of progress in 60 s", address=old)
            assert not await ex.moved("b", new) and ex.excluded("b")
            await ex.exclude("c", "c", reason=reason, until=None, address=old)
            assert not await ex.moved("c", new) and ex.excluded("c")

    asyncio.run(run())
