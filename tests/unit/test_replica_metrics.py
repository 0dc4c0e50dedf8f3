"""Per-replica and per-group metrics without a network: what the stores keep of every
replica's reports, how the coordinator moves a job on the speaker's reports only, and the
figures `status` and `watch` print, computed from plain records."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.job_record import Job, Progress
from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import Placement, Plan
from coordinator.replica_metrics import summarise_replicas
from coordinator.serde import job_info_pb
from coordinator.step_metrics import StepMetrics, bytes_per_step
from coordinator.store import SQLiteStore, StateStore, open_store

pytestmark = pytest.mark.unit

SPEC = """
name: replicas
model: {zoo: gpt, args: {layers: 2, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 8, micro_batches: 4}
steps: 10
parallel: {planner: even, stages: 2, replicas: 2}
"""


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("clean_redis_url")
    opened = open_store(url)
    yield opened
    opened.close()


def two_by_two_job() -> Job:
    """A job planned as 2 stages x 2 replicas on workers w0..w3 (replica 1 on w2, w3)."""
    placements = tuple(
        Placement(s, f"w{2 * r + s}", f"w{2 * r + s}", "127.0.0.1:1", 1, 1, 1.0, replica=r)
        for r in range(2)
        for s in range(2)
    )
    job = Job("j1", "replicas", parse_job_spec(SPEC), epoch=1)
    job.plan = Plan("j1", 1, "even", 0, {}, placements)
    return job


def report(
    step: int, stage: int, replica: int, *, loss: float | None = None, **extra: Any
) -> Progress:
    return Progress(
        worker_id=f"w{2 * replica + stage}",
        job_id="j1",
        epoch=1,
        stage=stage,
        step=step,
        loss=loss,
        step_seconds=extra.pop("step_seconds", 0.5),
        sent=extra.pop("sent", {}),
        finished=False,
        drained=False,
        error="",
        replica=replica,
        speaker=replica == 0,
        **extra,
    )


def record(step: int, stage: int, replica: int, **fields: Any) -> dict[str, Any]:
    """A stored metric record as the store hands it back."""
    r: dict[str, Any] = {"epoch": 1, "step": step, "stage": stage, "samples": 4.0, **fields}
    if replica:
        r["replica"] = replica
    return r


# -- the stores --------------------------------------------------------------------------


def test_every_replica_of_a_stage_keeps_its_own_record(store: StateStore) -> None:
    store.put_metric("j1", 3, 1, {"loss": 2.0})
    store.put_metric("j1", 3, 1, {"replica_loss": 2.5}, replica=1)
    store.put_metric("j1", 3, 0, {"x": 1}, replica=1)
    store.put_metric("j1", 3, 0, {"x": 0})
    assert store.metrics("j1") == [
        {"x": 0, "step": 3, "stage": 0},
        {"x": 1, "step": 3, "stage": 0, "replica": 1},
        {"loss": 2.0, "step": 3, "stage": 1},
        {"replica_loss": 2.5, "step": 3, "stage": 1, "replica": 1},
    ]
    store.put_metric("j1", 3, 1, {"replica_loss": 1.5}, replica=1)  # the step re-run
    assert [m for m in store.metrics("j1") if m.get("replica") == 1][-1] == {
        "replica_loss": 1.5,
        "step": 3,
        "stage": 1,
        "replica": 1,
    }


def test_a_negative_replica_is_refused_and_nothing_is_written(store: StateStore) -> None:
    with pytest.raises(ValueError, match="replica"):
        store.put_metric("j1", 0, 0, {"x": 1}, replica=-1)
    assert store.metrics("j1") == []


def test_a_version_1_sqlite_file_keeps_its_metrics_as_replica_0s(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "CREATE TABLE metrics (job_id TEXT NOT NULL, step INTEGER NOT NULL, stage INTEGER "
            "NOT NULL, body TEXT NOT NULL, PRIMARY KEY (job_id, step, stage)) WITHOUT ROWID"
        )
        db.execute("INSERT INTO metrics VALUES ('j1', 2, 1, '{\"loss\": 0.5}')")
        db.execute("PRAGMA user_version = 1")
    with SQLiteStore(str(path)) as store:
        assert store.metrics("j1") == [{"loss": 0.5, "step": 2, "stage": 1}]
        store.put_metric("j1", 2, 1, {"loss": 0.75}, replica=1)
        assert len(store.metrics("j1")) == 2
    with SQLiteStore(str(path)) as again:  # opened once more: migrated only once
        assert [m.get("replica", 0) for m in again.metrics("j1")] == [0, 1]


# -- the coordinator's step metrics ------------------------------------------------------


def test_only_the_speaker_moves_the_job_and_every_replica_is_stored(tmp_path: Path) -> None:
    async def run() -> tuple[Job, list[dict[str, Any]], list[bool]]:
        job = two_by_two_job()
        with SQLiteStore(str(tmp_path / "s.db")) as store:
            metrics = StepMetrics(store)
            moved = [
                await metrics.record(job, report(0, 0, 1, sent={1: 100}, sync_bytes=40)),
                await metrics.record(job, report(0, 0, 0, sent={1: 300}, sync_bytes=40)),
                await metrics.record(job, report(0, 1, 1, loss=9.0, step_seconds=2.0)),
                await metrics.record(job, report(0, 1, 0, loss=3.0, step_seconds=0.5)),
            ]
            return job, store.metrics("j1"), moved

    job, stored, moved = asyncio.run(run())
    assert moved == [False, False, False, True]
    assert job.loss == 3.0 and job.steps_done == 1 and job.step_seconds == 0.5
    assert job.bytes_per_step == 300  # the speaker's pipeline, not both
    assert [(m["stage"], m.get("replica", 0)) for m in stored] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m["loss"] for m in stored if "loss" in m] == [3.0]
    assert stored[3]["replica_loss"] == 9.0 and stored[3]["speaker"] is False
    assert {m["samples"] for m in stored} == {4.0}  # batch 8 over 2 replicas


def test_a_replica_reporting_alone_does_not_set_the_job_loss(tmp_path: Path) -> None:
    async def run() -> Job:
        job = two_by_two_job()
        with SQLiteStore(str(tmp_path / "s.db")) as store:
            for step in range(3):
                await StepMetrics(store).record(job, report(step, 1, 1, loss=1.0))
        return job

    job = asyncio.run(run())
    assert job.loss is None and job.steps_done == 0


# -- the figures -------------------------------------------------------------------------


def test_replica_figures_take_each_step_at_its_slowest_stage() -> None:
    records = [
        record(s, st, r, step_seconds=t, sync_bytes=1000, sync_seconds=0.1 * (st + 1))
        for s in range(4)
        for r, times in ((0, (0.5, 1.0)), (1, (2.0, 1.5)))
        for st, t in enumerate(times)
    ]
    got = summarise_replicas(records, epoch=1)
    r0, r1 = got.replicas
    assert (r0.replica, r0.last_step, r0.steps) == (0, 3, 4)
    assert r0.samples_per_s == pytest.approx(4.0 / 1.0)
    assert r1.samples_per_s == pytest.approx(4.0 / 2.0)
    assert r0.sync_bytes_per_step == 2000  # both stages to their groups
    assert r0.sync_seconds_per_step == pytest.approx(0.2)  # the slower stage's exchange


def test_group_figures_count_rounds_and_the_shares_of_the_latest() -> None:
    records = []
    for s in range(8):
        averaged = s % 4 == 3  # local SGD, period 4
        for r in range(3):
            # Every step exchanges the loss; replica 2's share missed the last average.
            shares = 2 if s == 7 else 3
            records.append(
                record(
                    s,
                    0,
                    r,
                    step_seconds=1.0,
                    sync_bytes=600 if averaged else 0,
                    sync_seconds=0.3 if averaged else 0.0,
                    staleness=0 if averaged else s % 4 + 1,
                    shares=shares,
                )
            )
    (group,) = summarise_replicas(records, epoch=1).groups
    assert group.stage == 0 and group.replicas == (0, 1, 2) and group.steps == 8
    assert group.rounds == 2 and group.shares == 2
    assert group.sync_bytes_per_step == 3 * 600 * 2 // 8
    assert group.sync_seconds_per_step == pytest.approx(0.3 * 2 / 8)
    assert group.staleness == 0  # every member averaged at its latest step


def test_staleness_is_the_stalest_stage_at_the_replicas_latest_step() -> None:
    records = [record(5, 0, 0, staleness=2), record(5, 1, 0, staleness=3), record(4, 0, 0)]
    (replica,) = summarise_replicas(records, epoch=1).replicas
    assert replica.staleness == 3 and replica.last_step == 5


def test_figures_cover_the_current_epoch_and_its_last_steps_only() -> None:
    old = [record(s, 0, 0, step_seconds=9.0) | {"epoch": 0} for s in range(5)]
    new = [record(s, 0, 0, step_seconds=1.0 if s >= 10 else 4.0) for s in range(30)]
    (replica,) = summarise_replicas(old + new, epoch=1, window=20).replicas
    assert replica.steps == 20 and replica.samples_per_s == pytest.approx(4.0 / 1.0)
    assert summarise_replicas(old, epoch=1).replicas == ()


def test_the_job_view_carries_replica_and_group_figures_and_the_speakers_losses() -> None:
    job = two_by_two_job()
    records = [
        record(0, 1, 0, loss=3.0, speaker=True, step_seconds=1.0),
        record(0, 1, 1, replica_loss=9.0, step_seconds=2.0, sync_bytes=10, shares=2),
        record(0, 0, 0, speaker=True, step_seconds=1.0, sync_bytes=10, shares=2),
    ]
    info = job_info_pb(job, records)
    assert [(m.step, m.loss) for m in info.metrics] == [(0, 3.0)]
    assert [(r.replica, r.speaker) for r in info.replica_metrics] == [(0, True), (1, False)]
    assert info.replica_metrics[1].samples_per_s == pytest.approx(2.0)
    assert [(g.stage, list(g.replicas), g.shares) for g in info.group_metrics] == [
        (0, [0], 2),
        (1, [0, 1], 2),
    ]
    assert len(job_info_pb(job).replica_metrics) == 0  # no records asked for, none made


def test_bytes_per_step_come_from_the_newest_step_every_stage_reported() -> None:
    records: list[dict[str, Any]] = [
        {"step": 4, "stage": 0, "epoch": 2, "bytes": 100},
        {"step": 4, "stage": 1, "epoch": 2, "bytes": 20},
        {"step": 5, "stage": 1, "epoch": 2, "bytes": 30},  # the newest loss: stage 0 to come
        {"step": 5, "stage": 0, "epoch": 1, "bytes": 999},  # an older plan's
        {"step": 5, "stage": 0, "epoch": 2, "replica": 1, "bytes": 999},  # another replica's
    ]
    assert bytes_per_step(records, epoch=2, replica=0, stages=2, fallback=7) == 120
    records.append({"step": 5, "stage": 0, "epoch": 2, "bytes": 110})
    assert bytes_per_step(records, epoch=2, replica=0, stages=2, fallback=7) == 140
    # No step with every stage yet (a new plan's first): what the job had.
    assert bytes_per_step(records[2:3], epoch=2, replica=0, stages=2, fallback=7) == 7
