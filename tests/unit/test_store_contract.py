"""The state store contract, run unchanged against SQLite and a real Redis.

Every test that takes `store` runs once per backend. Corruption is simulated by writing
garbage straight into the SQLite table or the Redis key, bypassing the store.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.store import RedisStore, SQLiteStore, StateStore, StoreError, open_store

pytestmark = pytest.mark.unit

PREFIX = "archipelago:"


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """A fresh, empty store of each kind."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("clean_redis_url")
    opened = open_store(url)
    yield opened
    opened.close()


def reopen(store: StateStore) -> StateStore:
    """A second, independent store on the same file or database, as a restarted coordinator."""
    return open_store(store.url)


def job(job_id: str, created_at: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "created_at": created_at, **extra}


def write_raw(store: StateStore, sqlite_sql: str, redis_key: str, value: bytes) -> None:
    """Overwrite stored state behind the store's back."""
    if isinstance(store, SQLiteStore):
        with contextlib.closing(sqlite3.connect(store.url.removeprefix("sqlite:///"))) as db, db:
            db.execute(sqlite_sql, (value,))
    else:
        with contextlib.closing(redis.Redis.from_url(store.url)) as client:
            client.set(PREFIX + redis_key, value)


# -- jobs ----------------------------------------------------------------------------------


def test_job_record_round_trips_exactly(store: StateStore) -> None:
    record = job(
        "j1",
        created_at=1712345678.123456789,
        lr=0.1 + 0.2,
        tiny=5e-324,
        big=2**62 + 1,
        neg_zero=-0.0,
        inf=float("inf"),
        name="île — 模型 🚀",
        nested={"stages": [[1, 2.5, None], {"ok": True, "x": []}], "": "empty key"},
    )
    store.put_job(record)
    assert store.get_job("j1") == record
    assert repr(store.get_job("j1")) == repr(record)  # same float bits, -0.0 included


def test_put_job_replaces_the_whole_record(store: StateStore) -> None:
    store.put_job(job("j1", state="queued", extra=1))
    store.put_job(job("j1", state="running"))
    assert store.get_job("j1") == job("j1", state="running")
    assert len(store.list_jobs()) == 1


def test_unknown_ids_read_as_none(store: StateStore) -> None:
    assert store.get_job("nope") is None
    assert store.get_plan("nope") is None
    assert store.get_worker("nope") is None
    assert store.get_blob("nope") is None
    assert store.latest_checkpoint("nope") is None
    assert store.metrics("nope") == []
    assert store.list_jobs() == [] and store.list_workers() == []


def test_list_jobs_orders_by_created_at_then_job_id(store: StateStore) -> None:
    for job_id, created in [("c", 2.0), ("b", 1.0), ("a", 2.0), ("z", 0.5), ("é", 1.0)]:
        store.put_job(job(job_id, created))
    assert [j["job_id"] for j in store.list_jobs()] == ["z", "b", "é", "a", "c"]
    store.put_job(job("z", 3.0))  # a re-put moves the job with its new created_at
    assert [j["job_id"] for j in store.list_jobs()] == ["b", "é", "a", "c", "z"]


def test_delete_job_removes_its_plan_metrics_checkpoints_and_blobs_only(store: StateStore) -> None:
    for job_id in ("j1", "j10", "j1:x"):  # neighbours by prefix must survive
        store.put_job_and_plan(job(job_id), {"stages": 2})
        store.put_metric(job_id, 1, 0, {"loss": 1.0})
        store.put_checkpoint_part(job_id, 5, 0, 1, b"ck")
        store.put_blob(f"job/{job_id}/data", b"blob")
    store.put_checkpoint_part("j1", 9, 0, 2, b"partial")
    store.put_blob("job/j1/nested/deeper", b"x")
    store.put_blob("jobs/j1/other", b"y")

    store.delete_job("j1")

    assert store.get_job("j1") is None and store.get_plan("j1") is None
    assert store.metrics("j1") == [] and store.latest_checkpoint("j1") is None
    with pytest.raises(StoreError):
        store.checkpoint_parts("j1", 5)
    assert store.get_blob("job/j1/data") is None and store.get_blob("job/j1/nested/deeper") is None
    assert store.get_blob("jobs/j1/other") == b"y"
    for job_id in ("j10", "j1:x"):
        assert store.get_job(job_id) == job(job_id)
        assert store.get_plan(job_id) == {"stages": 2}
        assert len(store.metrics(job_id)) == 1
        assert store.checkpoint_parts(job_id, 5) == [b"ck"]
        assert store.get_blob(f"job/{job_id}/data") == b"blob"
    assert [j["job_id"] for j in store.list_jobs()] == ["j10", "j1:x"]
    store.delete_job("j1")  # deleting again is harmless
    # A fresh job of the same id starts with nothing left over.
    store.put_checkpoint_part("j1", 9, 1, 2, b"new")
    with pytest.raises(StoreError, match="1 of 2"):
        store.checkpoint_parts("j1", 9)


def test_record_without_its_id_is_rejected_and_nothing_is_written(store: StateStore) -> None:
    with pytest.raises(ValueError, match="job_id"):
        store.put_job({"created_at": 1.0})
    with pytest.raises(ValueError, match="worker_id"):
        store.put_worker({"host": "a"})
    with pytest.raises(ValueError, match="created_at"):
        store.put_job(job("j1", created_at="yesterday"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="JSON"):
        store.put_job(job("j1", handle=object()))
    assert store.list_jobs() == [] and store.list_workers() == []


# -- plans ---------------------------------------------------------------------------------


def test_put_plan_keeps_only_the_latest(store: StateStore) -> None:
    store.put_plan("j1", {"version": 1, "stages": [[0, 1], [2]]})
    store.put_plan("j1", {"version": 2})
    assert store.get_plan("j1") == {"version": 2}
    assert store.get_plan("j2") is None


def test_put_job_and_plan_makes_both_visible(store: StateStore) -> None:
    store.put_job(job("j1", state="queued"))
    store.put_job_and_plan(job("j1", state="planned"), {"version": 7})
    assert store.get_job("j1") == job("j1", state="planned")
    assert store.get_plan("j1") == {"version": 7}
    with reopen(store) as other:
        assert other.get_job("j1") == job("j1", state="planned")
        assert other.get_plan("j1") == {"version": 7}


def test_put_job_and_plan_with_a_bad_plan_changes_nothing(store: StateStore) -> None:
    store.put_job_and_plan(job("j1", state="queued"), {"version": 1})
    with pytest.raises(ValueError):
        store.put_job_and_plan(job("j1", state="planned"), {"bad": {1, 2}})
    assert store.get_job("j1") == job("j1", state="queued")
    assert store.get_plan("j1") == {"version": 1}


# -- workers -------------------------------------------------------------------------------


def test_workers_replace_list_in_id_order_and_delete(store: StateStore) -> None:
    for worker_id in ("w2", "w10", "w1"):
        store.put_worker({"worker_id": worker_id, "gpus": 1})
    store.put_worker({"worker_id": "w2", "gpus": 8, "island": "eu"})
    assert store.get_worker("w2") == {"worker_id": "w2", "gpus": 8, "island": "eu"}
    assert [w["worker_id"] for w in store.list_workers()] == ["w1", "w10", "w2"]
    store.delete_worker("w10")
    store.delete_worker("never-seen")
    assert store.get_worker("w10") is None
    assert [w["worker_id"] for w in store.list_workers()] == ["w1", "w2"]


# -- exclusions ----------------------------------------------------------------------------


def test_exclusions_replace_list_in_id_order_delete_and_survive_a_reopen(
    store: StateStore,
) -> None:
    for worker_id in ("w2", "w10", "w1"):
        store.put_exclusion({"worker_id": worker_id, "reason": "unreachable", "until": 5.0})
    store.put_exclusion({"worker_id": "w2", "reason": "NaN gradients", "until": None})
    store.delete_exclusion("w10")
    store.delete_exclusion("never-seen")
    expected = [
        {"worker_id": "w1", "reason": "unreachable", "until": 5.0},
        {"worker_id": "w2", "reason": "NaN gradients", "until": None},
    ]
    assert store.list_exclusions() == expected
    assert store.list_workers() == []  # an exclusion is not a worker record
    with reopen(store) as again:
        assert again.list_exclusions() == expected
    with pytest.raises(ValueError, match="worker_id"):
        store.put_exclusion({"reason": "no id"})
    assert len(store.list_exclusions()) == 2


# -- metrics -------------------------------------------------------------------------------


def test_metrics_come_back_ordered_by_step_then_stage_with_both_fields(store: StateStore) -> None:
    pairs = [(step, stage) for step in (0, 1, 2, 10) for stage in (0, 1, 2, 11)]
    for step, stage in random.Random(0).sample(pairs, len(pairs)):
        store.put_metric("j1", step, stage, {"loss": step + stage / 100})
    store.put_metric("j2", 1, 0, {"loss": 9.0})
    got = store.metrics("j1")
    assert [(m["step"], m["stage"]) for m in got] == sorted(pairs)
    assert got[5] == {"loss": 1 + 1 / 100, "step": 1, "stage": 1}


def test_metric_for_the_same_step_and_stage_overwrites(store: StateStore) -> None:
    store.put_metric("j1", 3, 1, {"loss": 2.0, "stale": True})
    store.put_metric("j1", 3, 1, {"loss": 1.5})  # the step re-run after a recovery
    assert store.metrics("j1") == [{"loss": 1.5, "step": 3, "stage": 1}]


def test_metrics_since_step_filters_older_steps(store: StateStore) -> None:
    for step in range(6):
        store.put_metric("j1", step, 0, {"loss": float(step)})
    assert [m["step"] for m in store.metrics("j1", since_step=4)] == [4, 5]
    assert store.metrics("j1", since_step=6) == []
    assert len(store.metrics("j1", since_step=0)) == 6


def test_metric_writes_from_many_threads_all_land(store: StateStore) -> None:
    def write(stage: int) -> None:
        for step in range(50):
            store.put_metric("j1", step, stage, {"t": threading.get_ident()})

    run_in_threads([lambda s=s: write(s) for s in range(8)])
    assert len(store.metrics("j1")) == 50 * 8


def test_a_thousand_metric_writes_are_all_kept_in_step_order(store: StateStore) -> None:
    for step in range(1000):
        store.put_metric("j1", step, 0, {"loss": 1.0 / (step + 1)})
    records = store.metrics("j1")
    assert [r["step"] for r in records] == list(range(1000))
    assert records[999]["loss"] == 1.0 / 1000


# -- checkpoints ---------------------------------------------------------------------------


def test_checkpoint_is_complete_only_when_every_part_is_present(store: StateStore) -> None:
    assert store.put_checkpoint_part("j1", 10, 2, 3, b"two") is False
    assert store.put_checkpoint_part("j1", 10, 0, 3, b"zero") is False
    assert store.latest_checkpoint("j1") is None
    with pytest.raises(StoreError, match="not complete"):
        store.checkpoint_parts("j1", 10)
    assert store.put_checkpoint_part("j1", 10, 1, 3, b"one") is True
    assert store.checkpoint_parts("j1", 10) == [b"zero", b"one", b"two"]
    assert store.latest_checkpoint("j1") == 10


def test_checkpoint_parts_of_an_unknown_step_raise(store: StateStore) -> None:
    store.put_checkpoint_part("j1", 10, 0, 1, b"x")
    with pytest.raises(StoreError, match="step 11"):
        store.checkpoint_parts("j1", 11)


def test_latest_checkpoint_ignores_incomplete_ones(store: StateStore) -> None:
    store.put_checkpoint_part("j1", 10, 0, 2, b"a")
    store.put_checkpoint_part("j1", 10, 1, 2, b"b")
    store.put_checkpoint_part("j1", 20, 0, 2, b"a")  # a crash before stage 1 wrote step 20
    assert store.latest_checkpoint("j1") == 10
    assert store.latest_checkpoint("j2") is None


def test_rewriting_a_part_of_a_complete_checkpoint_replaces_it(store: StateStore) -> None:
    store.put_checkpoint_part("j1", 4, 0, 2, b"a")
    store.put_checkpoint_part("j1", 4, 1, 2, b"b")
    assert store.put_checkpoint_part("j1", 4, 1, 2, b"b2") is True
    assert store.checkpoint_parts("j1", 4) == [b"a", b"b2"]


def test_part_with_a_new_stage_count_restarts_that_checkpoint(store: StateStore) -> None:
    store.put_checkpoint_part("j1", 20, 0, 3, b"old0")
    store.put_checkpoint_part("j1", 20, 1, 3, b"old1")
    # Re-planned to two stages and re-run: the three-stage parts must not count.
    assert store.put_checkpoint_part("j1", 20, 1, 2, b"new1") is False
    with pytest.raises(StoreError, match="1 of 2"):
        store.checkpoint_parts("j1", 20)
    assert store.put_checkpoint_part("j1", 20, 0, 2, b"new0") is True
    assert store.checkpoint_parts("j1", 20) == [b"new0", b"new1"]


def test_part_outside_the_stage_range_is_rejected(store: StateStore) -> None:
    for step, stage, num_stages in [(1, 2, 2), (1, -1, 2), (-1, 0, 1), (1, 0, 0)]:
        with pytest.raises(ValueError):
            store.put_checkpoint_part("j1", step, stage, num_stages, b"x")
    assert store.latest_checkpoint("j1") is None


def test_prune_keeps_the_newest_complete_checkpoints(store: StateStore) -> None:
    for step in (10, 20, 30, 40):
        for stage in range(2):
            store.put_checkpoint_part("j1", step, stage, 2, f"{step}/{stage}".encode())
    store.put_checkpoint_part("j1", 15, 0, 2, b"stale partial")
    store.put_checkpoint_part("j1", 50, 0, 2, b"in progress")
    store.put_checkpoint_part("j2", 10, 0, 1, b"other job")

    store.prune_checkpoints("j1", keep=2)

    assert store.latest_checkpoint("j1") == 40
    assert store.checkpoint_parts("j1", 30) == [b"30/0", b"30/1"]
    for gone in (10, 15, 20):
        with pytest.raises(StoreError):
            store.checkpoint_parts("j1", gone)
    # The partial checkpoint newer than every complete one is still being written.
    assert store.put_checkpoint_part("j1", 50, 1, 2, b"done") is True
    assert store.checkpoint_parts("j1", 50) == [b"in progress", b"done"]
    assert store.checkpoint_parts("j2", 10) == [b"other job"]
    # Part 0 of step 15 went too: re-writing part 1 alone does not complete it.
    assert store.put_checkpoint_part("j1", 15, 1, 2, b"x") is False


def test_prune_without_a_complete_checkpoint_keeps_partial_ones(store: StateStore) -> None:
    store.put_checkpoint_part("j1", 10, 0, 2, b"a")
    store.prune_checkpoints("j1", keep=1)
    assert store.put_checkpoint_part("j1", 10, 1, 2, b"b") is True
    with pytest.raises(ValueError):
        store.prune_checkpoints("j1", keep=0)


def test_parts_written_concurrently_complete_exactly_once(store: StateStore) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def write(stage: int) -> None:
        done = store.put_checkpoint_part("j1", 7, stage, 8, bytes([stage]) * 100_000)
        with lock:
            results.append(done)

    run_in_threads([lambda s=s: write(s) for s in range(8)])
    assert sorted(results) == [False] * 7 + [True]
    assert store.checkpoint_parts("j1", 7) == [bytes([s]) * 100_000 for s in range(8)]


# -- blobs ---------------------------------------------------------------------------------


def test_large_blob_round_trips_byte_exactly(store: StateStore) -> None:
    data = os.urandom(8 * 1024 * 1024) + b"\x00\xff" * 7
    store.put_blob("job/j1/optimizer", data)
    assert store.get_blob("job/j1/optimizer") == data
    store.put_blob("job/j1/optimizer", b"")
    assert store.get_blob("job/j1/optimizer") == b""


def test_large_checkpoint_part_round_trips_byte_exactly(store: StateStore) -> None:
    data = os.urandom(8 * 1024 * 1024)
    assert store.put_checkpoint_part("j1", 1, 0, 1, data) is True
    assert store.checkpoint_parts("j1", 1) == [data]


# -- durability and errors -----------------------------------------------------------------


def test_a_reopened_store_sees_everything(store: StateStore) -> None:
    store.put_job_and_plan(job("j1", 1.5, state="running"), {"version": 3})
    store.put_worker({"worker_id": "w1", "island": "eu"})
    store.put_metric("j1", 2, 1, {"loss": 0.25})
    store.put_checkpoint_part("j1", 2, 0, 1, b"\x00state")
    store.put_blob("job/j1/spec", b"spec bytes")
    store.close()

    with reopen(store) as again:
        assert again.list_jobs() == [job("j1", 1.5, state="running")]
        assert again.get_plan("j1") == {"version": 3}
        assert again.list_workers() == [{"worker_id": "w1", "island": "eu"}]
        assert again.metrics("j1") == [{"loss": 0.25, "step": 2, "stage": 1}]
        assert again.latest_checkpoint("j1") == 2
        assert again.checkpoint_parts("j1", 2) == [b"\x00state"]
        assert again.get_blob("job/j1/spec") == b"spec bytes"


def test_two_open_stores_see_each_others_writes(store: StateStore) -> None:
    with reopen(store) as other:
        store.put_job(job("j1"))
        assert other.get_job("j1") == job("j1")
        other.put_metric("j1", 0, 0, {"loss": 1.0})
        assert store.metrics("j1") == [{"loss": 1.0, "step": 0, "stage": 0}]


def test_corrupt_record_raises_store_error_naming_its_key(store: StateStore) -> None:
    store.put_job(job("j-bad"))
    store.put_worker({"worker_id": "w-bad"})
    write_raw(store, "UPDATE jobs SET body = ? WHERE job_id = 'j-bad'", "job:j-bad", b"{not json")
    write_raw(
        store, "UPDATE workers SET body = ? WHERE worker_id = 'w-bad'", "worker:w-bad", b"[1, 2]"
    )
    with pytest.raises(StoreError, match=r"corrupt record at .*j-bad"):
        store.get_job("j-bad")
    with pytest.raises(StoreError, match="j-bad"):
        store.list_jobs()
    with pytest.raises(StoreError, match=r"corrupt record at .*w-bad"):
        store.list_workers()


def test_open_store_rejects_an_unknown_scheme() -> None:
    with pytest.raises(StoreError, match="ftp://x") as raised:
        open_store("ftp://x")
    assert "sqlite://" in str(raised.value) and "redis://" in str(raised.value)
    with pytest.raises(StoreError, match="empty"):
        open_store("")


def test_open_store_reports_an_unreachable_redis_without_its_password() -> None:
    with pytest.raises(StoreError, match=r"cannot reach Redis at redis://127\.0\.0\.1:1/0"):
        open_store("redis://127.0.0.1:1/0")
    with pytest.raises(StoreError) as raised:
        open_store("redis://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(raised.value)
    with pytest.raises(StoreError, match="database"):
        open_store("redis://127.0.0.1:1/zero")


def test_open_store_reads_bare_paths_and_memory_as_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "bare.db"
    with open_store(str(path)) as bare:
        assert isinstance(bare, SQLiteStore)
        bare.put_job(job("j1"))
    with open_store(f"sqlite:///{path}") as same:  # four slashes: an absolute path
        assert same.url == f"sqlite:///{path}"
        assert same.get_job("j1") == job("j1")
    with (
        contextlib.closing(sqlite3.connect(path)) as db,
        open_store("sqlite://:memory:") as memory,
    ):
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert memory.get_job("j1") is None
        memory.put_job(job("j1"))
        assert memory.get_job("j1") == job("j1")


def test_open_store_names_a_missing_sqlite_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StoreError, match=str(missing)):
        open_store(f"sqlite:///{missing / 'state.db'}")
    with pytest.raises(StoreError, match="three slashes"):
        open_store("sqlite://state.db")


def test_sqlite_url_with_three_slashes_names_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with open_store("sqlite:///sub/state.db") as relative:
        relative.put_job(job("j1"))
    with open_store(str(tmp_path / "sub" / "state.db")) as same:
        assert same.get_job("j1") == job("j1")
    for memory_url in ("sqlite://:memory:", "sqlite:///:memory:"):
        with open_store(memory_url) as memory:
            assert memory.list_jobs() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no file named ":memory:"


def test_redis_store_keeps_to_its_prefix_and_stores_parts_raw(clean_redis_url: str) -> None:
    with contextlib.closing(redis.Redis.from_url(clean_redis_url)) as client:
        client.set("someone:else", b"keep me")
        with open_store(clean_redis_url) as store:
            assert isinstance(store, RedisStore)
            store.put_job_and_plan(job("j1"), {"v": 1})
            store.put_worker({"worker_id": "w1"})
            store.put_metric("j1", 0, 0, {"loss": 1.0})
            store.put_checkpoint_part("j1", 0, 0, 1, b"\x00raw\xff")
            store.put_blob("job/j1/x", b"blob")
            keys = {k.decode() for k in client.keys("*")}
            assert keys - {"someone:else"} and all(
                k.startswith(PREFIX) for k in keys - {"someone:else"}
            )
            assert client.get(f"{PREFIX}ckpt-part:0:0:j1") == b"\x00raw\xff"
            assert not any("staging" in k for k in keys)  # the upload was renamed, not left
            store.delete_job("j1")
            store.delete_worker("w1")
        assert {k.decode() for k in client.keys("*")} == {"someone:else"}
        assert client.get("someone:else") == b"keep me"


def run_in_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target in its own thread, released together, and re-raise the first error."""
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def wrapped(target: Callable[[], None]) -> None:
        try:
            barrier.wait()
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_discard_checkpoints_after_drops_later_steps_complete_or_not(store: StateStore) -> None:
    for step in (10, 20):
        for stage in range(2):
            store.put_checkpoint_part("j1", step, stage, 2, f"{step}/{stage}".encode())
    store.put_checkpoint_part("j1", 30, 0, 3, b"partial")
    store.discard_checkpoints_after("j1", 10)
    assert store.latest_checkpoint("j1") == 10
    assert store.checkpoint_parts("j1", 10) == [b"10/0", b"10/1"]
    # A new plan of another shape re-runs step 30: nothing of the old one mixes in.
    assert store.put_checkpoint_part("j1", 30, 0, 2, b"new0") is False
    assert store.put_checkpoint_part("j1", 30, 1, 2, b"new1") is True
    assert store.checkpoint_parts("j1", 30) == [b"new0", b"new1"]


# -- events ----------------------------------------------------------------------------------


def test_events_are_numbered_per_scope_and_come_back_in_order(store: StateStore) -> None:
    assert [store.put_event("j1", {"kind": "planned", "n": i}) for i in range(3)] == [1, 2, 3]
    assert store.put_event("cluster", {"kind": "joined"}) == 1
    events = store.events("j1")
    assert [(e["seq"], e["n"], e["kind"]) for e in events] == [
        (1, 0, "planned"),
        (2, 1, "planned"),
        (3, 2, "planned"),
    ]
    assert [e["seq"] for e in store.events("j1", after_seq=1)] == [2, 3]
    assert [e["seq"] for e in store.events("j1", after_seq=0, limit=2)] == [1, 2]
    assert store.events("j1", after_seq=3) == []
    assert store.events("nobody") == []
    assert [e["kind"] for e in store.events("cluster")] == ["joined"]


def test_events_survive_a_reopen_and_go_with_their_job(store: StateStore) -> None:
    store.put_job({"job_id": "j1", "created_at": 1.0})
    store.put_event("j1", {"kind": "submitted"})
    store.put_event("cluster", {"kind": "joined"})
    again = reopen(store)
    try:
        assert [e["kind"] for e in again.events("j1")] == ["submitted"]
        again.delete_job("j1")
        assert again.events("j1") == []
        assert [e["kind"] for e in again.events("cluster")] == ["joined"]
    finally:
        again.close()


def test_only_the_newest_events_of_a_scope_are_kept(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{type(store).__module__}.EVENTS_KEPT", 4)
    for i in range(10):
        store.put_event("j1", {"n": i})
    assert [e["n"] for e in store.events("j1")] == [6, 7, 8, 9]
    assert store.put_event("j1", {"n": 10}) == 11


def test_a_bad_event_is_refused_and_nothing_is_written(store: StateStore) -> None:
    with pytest.raises(ValueError, match="scope"):
        store.put_event("", {"kind": "x"})
    with pytest.raises(ValueError, match="event"):
        store.put_event("j1", {"bad": object()})
    with pytest.raises(ValueError, match="limit"):
        store.events("j1", limit=0)
    assert store.events("j1") == []
