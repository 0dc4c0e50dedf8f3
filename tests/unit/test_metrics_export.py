"""`archipelago metrics`: a job's stored step records as CSV (one row per record, sorted by
step, stage, replica) and as a TensorBoard run (the speaker's series and each replica's),
read back with the csv module and TensorBoard's own EventAccumulator; and the command's
refusals."""

from __future__ import annotations

import asyncio
import csv
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from archipelago.cli import main
from archipelago.metrics_export import (
    COLUMNS,
    MetricRow,
    rows_from_records,
    rows_from_views,
    write_csv,
    write_tensorboard,
)
from archipelago.views import RecordView
from coordinator.job_record import Job, Progress
from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import WorkerSlot
from coordinator.states import JobState
from coordinator.step_metrics import StepMetrics
from coordinator.store import SQLiteStore
from opdag.capture import capture
from opdag.zoo import build_model, example_batch
from tests.unit.stage_plans import planned_stages

pytestmark = pytest.mark.unit

GPT = {"layers": 1, "d_model": 16, "heads": 2, "context": 8}
SPEC = {
    "name": "export",
    "model": {"zoo": "gpt", "args": GPT},
    "data": {"corpus": "stdlib-text", "batch_size": 8, "micro_batches": 4},
    "steps": 3,
    "parallel": {"planner": "even", "stages": 2, "replicas": 2},
    "sync": {"kind": "sync"},
}
WORKERS = [WorkerSlot(f"w{i}", f"w{i}", f"127.0.0.1:{7300 + i}", 10.0) for i in range(4)]
STEPS = 3


def loss_of(step: int, replica: int) -> float:
    return 3.0 - 0.25 * step - 0.01 * replica


@pytest.fixture(scope="module")
def stored() -> list[dict[str, Any]]:
    """The records a job of 2 stages x 2 replicas stores over 3 steps, through the
    coordinator's own `StepMetrics`, read back from a real SQLite store."""
    spec = parse_job_spec(yaml.safe_dump(SPEC))
    model = capture(build_model("gpt", GPT, seed=0), example_batch("gpt", GPT, 2, device="meta"))
    plan, _ = planned_stages(model, spec, WORKERS)
    job = Job(job_id="j", name="export", spec=spec, state=JobState.RUNNING, epoch=1, plan=plan)
    store = SQLiteStore(":memory:")
    metrics = StepMetrics(store)

    async def report() -> None:
        for step in range(STEPS):
            # Reported out of order, as the workers' reports arrive.
            for p in sorted(plan.placements, key=lambda p: (-p.replica, -p.stage)):
                last = p.stage == 1
                await metrics.record(
                    job,
                    Progress(
                        worker_id=p.worker_id,
                        job_id="j",
                        epoch=1,
                        stage=p.stage,
                        step=step,
                        loss=loss_of(step, p.replica) if last else None,
                        step_seconds=0.5 + 0.1 * p.stage + 0.2 * p.replica,
                        sent={1 - p.stage: 1000 * (p.stage + 1)},
                        finished=False,
                        drained=False,
                        error="",
                        compute_seconds=0.25,
                        sync_bytes=400 + p.stage,
                        sync_seconds=0.05,
                        staleness=0,
                        shares=2,
                    ),
                )

    asyncio.run(report())
    records = store.metrics("j")
    store.close()
    assert len(records) == STEPS * 4
    return records


def test_csv_has_a_header_and_one_row_per_stored_record_sorted(
    stored: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "m.csv"
    write_csv(rows_from_records(reversed(stored)), path)
    with path.open() as f:
        lines = list(csv.reader(f))
    assert tuple(lines[0]) == COLUMNS
    assert COLUMNS == (
        "step",
        "stage",
        "replica",
        "epoch",
        "loss",
        "replica_loss",
        "step_seconds",
        "compute_seconds",
        "samples",
        "bytes",
        "sync_bytes",
        "sync_seconds",
        "staleness",
        "shares",
        "at",
    )
    rows = [dict(zip(COLUMNS, line, strict=True)) for line in lines[1:]]
    assert len(rows) == len(stored)
    keys = [(int(r["step"]), int(r["stage"]), int(r["replica"])) for r in rows]
    assert keys == sorted(keys) == [(s, st, r) for s in range(3) for st in (0, 1) for r in (0, 1)]
    by_key = {(r["step"], r["stage"], r.get("replica", 0)): r for r in stored}
    for row, key in zip(rows, keys, strict=True):
        record = by_key[key]
        for name in COLUMNS:
            if name in record or name == "replica":
                assert float(row[name]) == float(record.get(name, 0)), (key, name)
            else:
                assert row[name] == "", (key, name)
    # The speaker (replica 0) holds the loss, the other replica its own as replica_loss.
    last = [r for r in rows if r["stage"] == "1"]
    assert [float(r["loss"]) for r in last if r["replica"] == "0"] == [
        loss_of(s, 0) for s in range(3)
    ]
    assert all(r["loss"] == "" and r["replica_loss"] for r in last if r["replica"] == "1")
    assert all(float(r["samples"]) == 4.0 for r in rows)  # half the batch of 8 each


def test_tensorboard_run_holds_the_speakers_series_and_each_replicas(
    stored: list[dict[str, Any]], tmp_path: Path
) -> None:
    steps = write_tensorboard(rows_from_records(stored), tmp_path / "tb", batch_size=8)
    assert steps == STEPS
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "samples_per_s", "step_seconds", "bytes_per_step"} <= tags

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    def close(got: list[tuple[int, float]], want: list[float]) -> None:
        assert [s for s, _ in got] == list(range(STEPS))
        assert [v for _, v in got] == pytest.approx(want, rel=1e-6)

    close(series("loss"), [loss_of(s, 0) for s in range(STEPS)])
    # The speaker's last stage reports the loss: its step time is the job's pace.
    close(series("step_seconds"), [0.6] * STEPS)
    close(series("samples_per_s"), [8 / 0.6] * STEPS)
    # Both stages of the speaking pipeline: 1000 + 2000 bytes a step.
    close(series("bytes_per_step"), [3000.0] * STEPS)
    for replica in (0, 1):
        close(series(f"replica/{replica}/loss"), [loss_of(s, replica) for s in range(STEPS)])
        slowest = 0.6 + 0.2 * replica
        close(series(f"replica/{replica}/step_seconds"), [slowest] * STEPS)
        close(series(f"replica/{replica}/samples_per_s"), [4 / slowest] * STEPS)
        close(series(f"replica/{replica}/sync_bytes"), [801.0] * STEPS)
    # Each point carries the time the coordinator stored its record.
    first = events.Scalars("loss")[0]
    at = next(r["at"] for r in stored if r["step"] == 0 and r["stage"] == 1 and "loss" in r)
    assert first.wall_time == pytest.approx(at)


def record_view(step: int, stage: int, loss: float | None, seconds: float, sent: int) -> RecordView:
    return RecordView(
        step=step,
        stage=stage,
        replica=0,
        epoch=1,
        loss=loss,
        replica_loss=None,
        step_seconds=seconds,
        compute_seconds=seconds / 2,
        samples=16.0,
        bytes=sent,
        sync_bytes=0,
        sync_seconds=0.0,
        staleness=0,
        shares=0,
        at=100.0 + step,
        speaker=True,
    )


def test_rows_from_the_api_carry_every_field_of_each_record(tmp_path: Path) -> None:
    records = [
        record_view(1, 1, 2.0, 0.5, 700),
        record_view(0, 1, float("nan"), 0.4, 600),
        record_view(0, 0, None, 0.4, 900),
    ]
    rows = rows_from_views(records)
    assert [(r.step, r.stage) for r in rows] == [(0, 0), (0, 1), (1, 1)]
    assert rows[0] == MetricRow(
        step=0,
        stage=0,
        replica=0,
        epoch=1,
        step_seconds=0.4,
        compute_seconds=0.2,
        samples=16.0,
        bytes=900,
        sync_bytes=0,
        sync_seconds=0.0,
        staleness=0,
        shares=0,
        at=100.0,
    )
    assert rows[1].loss is not None and math.isnan(rows[1].loss)  # NaN stays NaN
    path = tmp_path / "api.csv"
    write_csv(rows, path)
    lines = path.read_text().splitlines()
    assert lines[1] == "0,0,0,1,,,0.4,0.2,16.0,900,0,0.0,0,0,100.0"
    assert write_tensorboard(rows, tmp_path / "tb", batch_size=16) == 2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("samples_per_s")] == pytest.approx([40.0, 32.0])
    # A step's bytes are its stages' together.
    assert [e.value for e in events.Scalars("bytes_per_step")] == [1500.0, 700.0]


def test_a_record_without_replica_or_sync_figures_reads_as_replica_0() -> None:
    # As an older coordinator stored it: no replica, no sync figures.
    (row,) = rows_from_records([{"step": 4, "stage": 0, "loss": 1.5, "speaker": True}])
    assert row == MetricRow(step=4, stage=0, replica=0, loss=1.5)


@pytest.mark.parametrize(
    "extra",
    [[], ["--csv", "a.csv", "--tensorboard", "tb"]],
    ids=["neither", "both"],
)
def test_metrics_wants_exactly_one_of_csv_and_tensorboard(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["metrics", "job", "--token", "t" * 16, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--csv" in err and "--tensorboard" in err


def test_metrics_refuses_an_output_it_cannot_write_before_asking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    # No coordinator listens on port 1: the refusal comes before any call (plain text on
    # loopback, so the last call below fails reaching it, not finding its authority).
    common = [
        "metrics", "job", "--operator-token", "t" * 16, "--coordinator", "127.0.0.1:1",
        "--insecure",
    ]  # fmt: skip
    cases = [
        (["--csv", str(a_file / "m.csv")], "is not a directory"),
        (["--csv", str(tmp_path)], "is a directory"),
        (["--tensorboard", str(a_file)], "exists and is not a directory"),
        (["--tensorboard", str(a_file / "tb")], "cannot create --tensorboard"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("archipelago: error: ") and message in err, err
    # A writable path gets as far as the coordinator, which is not there.
    assert main([*common, "--csv", str(tmp_path / "ok.csv")]) == 2
    assert "cannot reach the coordinator" in capsys.readouterr().err
    assert not (tmp_path / "ok.csv").exists()
