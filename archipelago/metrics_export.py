"""`archipelago metrics JOB --csv FILE | --tensorboard DIR`: a job's step metrics for other
tools.

The coordinator stores one record per (step, stage, replica) (`coordinator.step_metrics`).
A CSV holds one row per record, its columns `COLUMNS`, sorted by (step, stage, replica). A
TensorBoard run holds the job's series as the speaking replica sets them (loss,
samples_per_s, step_seconds, bytes_per_step, one point a step) and each replica's own under
`replica/R/`. Both are made from `MetricRow`s: from stored records (`rows_from_records`), or
from the records the coordinator's API streams (`rows_from_views`), every field of each.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, fields
from pathlib import Path
from typing import Any

from archipelago.client import ClientError, CoordinatorClient
from archipelago.errors import UsageError
from archipelago.views import RecordView


@dataclass(frozen=True)
class MetricRow:
    """One stored metric record: one stage of one replica at one step (None: not known)."""

    step: int
    stage: int | None = None
    replica: int | None = None
    epoch: int | None = None
    loss: float | None = None  # the speaker's loss (its last stage only)
    replica_loss: float | None = None  # another replica's loss
    step_seconds: float | None = None
    compute_seconds: float | None = None
    samples: float | None = None  # the replica's share of the batch
    bytes: int | None = None  # sent to the other stages of its pipeline
    sync_bytes: int | None = None  # sent to its sync group
    sync_seconds: float | None = None
    staleness: int | None = None
    shares: int | None = None
    at: float | None = None  # wall clock when the coordinator stored it


COLUMNS = tuple(f.name for f in fields(MetricRow))
_INTS = frozenset(
    {"step", "stage", "replica", "epoch", "bytes", "sync_bytes", "staleness", "shares"}
)


def _sort_key(row: MetricRow) -> tuple[int, int, int, int]:
    return (row.step, row.stage or 0, row.replica or 0, row.epoch or 0)


def rows_from_records(records: Iterable[Mapping[str, Any]]) -> list[MetricRow]:
    """Rows of stored records (each with "step" and "stage", "replica" when not 0)."""
    rows = []
    for r in records:
        values: dict[str, Any] = {}
        for name in COLUMNS:
            v = r.get(name)
            if name == "replica" and v is None:
                v = 0  # the store leaves out replica 0
            if isinstance(v, bool) or not isinstance(v, int | float):
                v = None
            elif name in _INTS:
                v = int(v)
            else:
                v = float(v)
            values[name] = v
        rows.append(MetricRow(**values))
    return sorted(rows, key=_sort_key)


def rows_from_views(records: Iterable[RecordView]) -> list[MetricRow]:
    """Rows of the records the coordinator's API streams (`CoordinatorClient.records`)."""
    return rows_from_records(asdict(r) for r in records)


def write_csv(rows: Sequence[MetricRow], path: Path) -> None:
    """A header line, then one line per row; an unknown value is an empty cell."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for row in rows:
            out.writerow("" if v is None else v for v in astuple(row))


def _speaker_points(
    rows: Sequence[MetricRow], batch_size: int
) -> list[tuple[int, float | None, dict[str, float]]]:
    """Per step, the job's figures as the speaker's loss-bearing row sets them; its bytes are
    those of every stage of its pipeline at that step (and epoch)."""
    stage_bytes: dict[tuple[int, int | None, int | None], int] = defaultdict(int)
    for r in rows:
        stage_bytes[(r.step, r.epoch, r.replica)] += r.bytes or 0
    points = []
    for r in rows:
        if r.loss is None:
            continue
        figures = {
            "loss": r.loss,
            "bytes_per_step": float(stage_bytes[(r.step, r.epoch, r.replica)]),
        }
        if r.step_seconds:
            figures["step_seconds"] = r.step_seconds
            figures["samples_per_s"] = batch_size / r.step_seconds
        points.append((r.step, r.at, figures))
    return points


def _replica_points(
    rows: Sequence[MetricRow],
) -> list[tuple[int, int, float | None, dict[str, float]]]:
    """Per replica and step: its loss, its pace (its slowest stage), its share of the batch
    over that, and what its stages sent their sync groups."""
    by: dict[tuple[int, int, int | None], list[MetricRow]] = defaultdict(list)
    for r in rows:
        if r.replica is not None:
            by[(r.replica, r.step, r.epoch)].append(r)
    points = []
    for (replica, step, _epoch), rs in sorted(by.items(), key=lambda kv: kv[0][:2]):
        figures: dict[str, float] = {}
        losses = [x for r in rs for x in (r.loss, r.replica_loss) if x is not None]
        if losses:
            figures["loss"] = losses[0]
        seconds = max((r.step_seconds or 0.0) for r in rs)
        if seconds > 0:
            figures["step_seconds"] = seconds
            samples = max((r.samples or 0.0) for r in rs)
            if samples > 0:
                figures["samples_per_s"] = samples / seconds
        figures["sync_bytes"] = float(sum(r.sync_bytes or 0 for r in rs))
        figures["staleness"] = float(max(r.staleness or 0 for r in rs))
        at = max((r.at for r in rs if r.at is not None), default=None)
        points.append((replica, step, at, figures))
    return points


def write_tensorboard(rows: Sequence[MetricRow], log_dir: Path, *, batch_size: int) -> int:
    """The job's series into a TensorBoard run in `log_dir`; returns the steps written."""
    from torch.utils.tensorboard import SummaryWriter  # slow to import: only when asked

    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        speaker = _speaker_points(rows, batch_size)
        for step, at, figures in speaker:
            for tag, value in figures.items():
                writer.add_scalar(tag, value, step, walltime=at)
        for replica, step, at, figures in _replica_points(rows):
            for tag, value in figures.items():
                writer.add_scalar(f"replica/{replica}/{tag}", value, step, walltime=at)
    finally:
        writer.close()
    return len({step for step, _, _ in speaker})


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"--csv {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write --csv {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"cannot write --csv {path}: permission denied")


def _check_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--tensorboard {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --tensorboard {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"cannot write into --tensorboard {path}: permission denied")


def export_job(
    client: CoordinatorClient,
    job_id: str,
    *,
    csv_path: Path | None = None,
    tensorboard_dir: Path | None = None,
) -> str:
    """Fetch the job's metrics and write them; returns the line to print. The output is
    checked before the coordinator is asked, so a bad path costs no call."""
    if (csv_path is None) == (tensorboard_dir is None):
        raise UsageError("give one of --csv FILE or --tensorboard DIR")
    if csv_path is not None:
        _check_file(csv_path)
    if tensorboard_dir is not None:
        _check_dir(tensorboard_dir)
    try:
        job = client.job(job_id)
        rows = rows_from_views(client.records(job_id))
    except ClientError as e:
        raise UsageError(str(e)) from None
    try:
        if csv_path is not None:
            write_csv(rows, csv_path)
            return f"job {job.job_id} ({job.name}): {len(rows)} records written to {csv_path}"
        assert tensorboard_dir is not None
        steps = write_tensorboard(rows, tensorboard_dir, batch_size=job.batch_size)
    except OSError as e:
        raise UsageError(f"cannot write the metrics: {e}") from None
    return (
        f"job {job.job_id} ({job.name}): {steps} steps written to TensorBoard run "
        f"{tensorboard_dir} (loss, samples_per_s, step_seconds, bytes_per_step)"
    )
