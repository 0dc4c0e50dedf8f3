"""`TimedStore`: every method of the store interface goes through to the wrapped store and
is timed under its own name, a call that raises included."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from typing import Any

import pytest

from coordinator.store import SQLiteStore, StateStore, StoreError
from coordinator.store.timed import TimedStore

pytestmark = pytest.mark.unit


class Observed:
    """What the wrapper reported, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, op: str, seconds: float) -> None:
        self.calls.append((op, seconds))

    @property
    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


@pytest.fixture
def observed() -> Observed:
    return Observed()


@pytest.fixture
def store(observed: Observed) -> Iterator[TimedStore]:
    timed = TimedStore(SQLiteStore(":memory:"), observed)
    yield timed
    timed.close()


def test_every_abstract_method_of_the_interface_is_delegated_explicitly() -> None:
    abstract = set(StateStore.__abstractmethods__)
    assert not TimedStore.__abstractmethods__
    for name in abstract:
        assert name in TimedStore.__dict__, f"{name} is not delegated"
        mine = inspect.signature(getattr(TimedStore, name))
        theirs = inspect.signature(getattr(StateStore, name))
        assert mine == theirs, f"{name}: {mine} != {theirs}"


def test_calls_reach_the_inner_store_and_are_timed_by_name(
    store: TimedStore, observed: Observed
) -> None:
    store.put_job({"job_id": "j", "created_at": 1.0})
    assert store.get_job("j") == {"job_id": "j", "created_at": 1.0}
    assert [j["job_id"] for j in store.list_jobs()] == ["j"]
    store.put_plan("j", {"epoch": 1})
    assert store.get_plan("j") == {"epoch": 1}
    store.put_job_and_plan({"job_id": "j", "created_at": 1.0, "x": 2}, {"epoch": 2})
    assert store.get_plan("j") == {"epoch": 2}
    store.put_worker({"worker_id": "w"})
    assert store.get_worker("w") == {"worker_id": "w"}
    assert store.list_workers() == [{"worker_id": "w"}]
    store.delete_worker("w")
    store.put_metric("j", 3, 1, {"loss": 0.5}, replica=2)
    assert store.metrics("j") == [{"loss": 0.5, "step": 3, "stage": 1, "replica": 2}]
    assert store.put_event("j", {"kind": "planned"}) == 1
    assert [e["seq"] for e in store.events("j", 0, 10)] == [1]
    assert store.put_checkpoint_part("j", 4, 0, 1, b"part") is True
    assert store.checkpoint_parts("j", 4) == [b"part"]
    assert store.latest_checkpoint("j") == 4
    store.prune_checkpoints("j", 1)
    store.discard_checkpoints_after("j", 10)
    store.put_blob("job/j/x", b"blob")
    assert store.get_blob("job/j/x") == b"blob"
    store.delete_job("j")
    assert store.get_job("j") is None
    assert observed.ops == [
        "put_job",
        "get_job",
        "list_jobs",
        "put_plan",
        "get_plan",
        "put_job_and_plan",
        "get_plan",
        "put_worker",
        "get_worker",
        "list_workers",
        "delete_worker",
        "put_metric",
        "metrics",
        "put_event",
        "events",
        "put_checkpoint_part",
        "checkpoint_parts",
        "latest_checkpoint",
        "prune_checkpoints",
        "discard_checkpoints_after",
        "put_blob",
        "get_blob",
        "delete_job",
        "get_job",
    ]
    assert all(seconds >= 0 for _, seconds in observed.calls)


def test_a_call_that_raises_is_timed_and_the_error_passes_through(
    store: TimedStore, observed: Observed
) -> None:
    with pytest.raises(ValueError):
        store.put_job({"no": "id"})
    with pytest.raises(StoreError):
        store.checkpoint_parts("j", 1)
    assert observed.ops == ["put_job", "checkpoint_parts"]


class SlowStore(SQLiteStore):
    """A store whose get_blob takes a known time."""

    def get_blob(self, key: str) -> bytes | None:
        time.sleep(0.05)
        return super().get_blob(key)


def test_the_seconds_reported_are_the_calls_duration(observed: Observed) -> None:
    timed = TimedStore(SlowStore(":memory:"), observed)
    timed.get_blob("k")
    timed.close()
    (op, seconds), _close = observed.calls
    assert op == "get_blob"
    assert 0.05 <= seconds < 1.0


def test_url_passes_through_and_the_observer_can_come_later() -> None:
    inner = SQLiteStore(":memory:")
    timed = TimedStore(inner)
    assert timed.url == inner.url
    timed.put_blob("a", b"1")  # nobody watches yet: nothing to report to
    seen: list[tuple[str, Any]] = []
    timed.observe = lambda op, s: seen.append((op, s))
    with timed:
        timed.get_blob("a")
    assert [op for op, _ in seen] == ["get_blob", "close"]
