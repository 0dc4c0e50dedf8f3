"""The state store's interface, `StateStore`, and the record checks both stores share.

Every write that touches more than one key or row is atomic (an SQLite transaction, a Redis
MULTI/EXEC), so a coordinator killed at any instant leaves either the old state or the new
one. Records are JSON-able dicts stored as UTF-8 JSON; checkpoint parts and blobs are raw
bytes. Arguments that break the contract (a record without its id, a stage outside
`range(num_stages)`) raise `ValueError` and write nothing; trouble with the store itself
(unreachable, corrupt, bad URL) raises `StoreError`.
"""

from __future__ import annotations

import abc
import json
import math
from types import TracebackType
from typing import Any

ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite://:memory:, "
    "a bare file path, redis://[:password@]host[:port][/db], or the same over TLS: "
    "rediss://[:password@]host[:port][/db][?ca=CA.pem][&cert=CLIENT.pem&key=CLIENT.key]"
)


# Events kept per scope: a timeline of months of re-plans and checkpoints, bounded.
EVENTS_KEPT = 5000


class StoreError(Exception):
    """The state store is unreachable, holds a corrupt record, or was named by a bad URL."""


class StateStore(abc.ABC):
    """Durable state of the coordinator."""

    url: str  # for display; never holds a password

    # -- jobs ------------------------------------------------------------------------------

    @abc.abstractmethod
    def put_job(self, job: dict[str, Any]) -> None:
        """Store `job` (it needs a "job_id"), replacing any earlier record of that job."""

    @abc.abstractmethod
    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None if there is none."""

    @abc.abstractmethod
    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, ordered by "created_at" (0.0 when absent) then job_id."""

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Remove the job with its plan, metrics, checkpoints and blobs under `job/{job_id}/`."""

    # -- plans -----------------------------------------------------------------------------

    @abc.abstractmethod
    def put_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        """Store `plan` as the job's latest plan."""

    @abc.abstractmethod
    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        """The job's latest plan, or None."""

    @abc.abstractmethod
    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        """Store a job's new record and its new plan in one atomic write."""

    # -- workers ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_worker(self, worker: dict[str, Any]) -> None:
        """Store `worker` (it needs a "worker_id"), replacing any earlier record."""

    @abc.abstractmethod
    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        """The worker's record, or None."""

    @abc.abstractmethod
    def list_workers(self) -> list[dict[str, Any]]:
        """Every worker, ordered by worker_id."""

    @abc.abstractmethod
    def delete_worker(self, worker_id: str) -> None:
        """Forget the worker (no error if unknown)."""

    # -- exclusions ------------------------------------------------------------------------

    @abc.abstractmethod
    def put_exclusion(self, exclusion: dict[str, Any]) -> None:
        """Store why and until when a worker is left out of planning (it needs a
        "worker_id"), replacing any earlier record of that worker."""

    @abc.abstractmethod
    def list_exclusions(self) -> list[dict[str, Any]]:
        """Every exclusion record, ordered by worker_id."""

    @abc.abstractmethod
    def delete_exclusion(self, worker_id: str) -> None:
        """Forget the worker's exclusion record (no error if there is none)."""

    # -- metrics ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_metric(
        self, job_id: str, step: int, stage: int, record: dict[str, Any], *, replica: int = 0
    ) -> None:
        """Store the metrics of one (step, stage, replica), replacing an earlier record of the
        same three."""

    @abc.abstractmethod
    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """Records with step >= since_step ordered by (step, stage, replica), each with
        "step"/"stage", and "replica" when it is not 0 (records of one pipeline read as
        they always have)."""

    # -- events ----------------------------------------------------------------------------

    @abc.abstractmethod
    def put_event(self, scope: str, record: dict[str, Any]) -> int:
        """Append `record` to the event log of `scope` (a job id, or "cluster"); returns its
        sequence number, 1, 2, ... within the scope. Only the newest EVENTS_KEPT events of a
        scope are kept; a job's go with `delete_job`."""

    @abc.abstractmethod
    def events(self, scope: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """The events of `scope` with a sequence number above `after_seq`, oldest first, at
        most `limit` of them, each with its "seq"."""

    # -- checkpoints -----------------------------------------------------------------------

    @abc.abstractmethod
    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        """Store one stage's part of the checkpoint at `step`; True once all parts are present.

        A part whose `num_stages` differs from the parts already stored for that step (the job
        was re-planned and the step re-run) discards those parts and starts the checkpoint anew.
        """

    @abc.abstractmethod
    def checkpoint_parts(self, job_id: str, step: int) -> list[bytes]:
        """The parts of a complete checkpoint ordered by stage; StoreError if not complete."""

    @abc.abstractmethod
    def latest_checkpoint(self, job_id: str) -> int | None:
        """The highest step whose checkpoint is complete, or None."""

    @abc.abstractmethod
    def prune_checkpoints(self, job_id: str, keep: int) -> None:
        """Keep the `keep` newest complete checkpoints and any incomplete one newer than all."""

    @abc.abstractmethod
    def discard_checkpoints_after(self, job_id: str, step: int) -> None:
        """Delete every checkpoint (complete or not) of a step after `step`: a job resumed
        from `step` runs those steps again under a new plan, whose parts must not mix with
        parts an abandoned plan left behind."""

    # -- blobs -----------------------------------------------------------------------------

    @abc.abstractmethod
    def put_blob(self, key: str, data: bytes) -> None:
        """Store bytes under `key`, replacing any earlier value."""

    @abc.abstractmethod
    def get_blob(self, key: str) -> bytes | None:
        """The bytes under `key`, or None."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""

    def __enter__(self) -> StateStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- record checks, shared by both stores ----------------------------------------------------


def record_id(record: dict[str, Any], field: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a dict, got {type(record).__name__}")
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"record needs a non-empty string {field!r}, got {value!r}")
    return value


def check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def created_at_of(job: dict[str, Any]) -> float:
    value = job.get("created_at", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"job created_at must be a finite number, got {value!r}")
    return float(value)


def check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_part(step: int, stage: int, num_stages: int) -> None:
    check_count("step", step, 0)
    check_count("num_stages", num_stages, 1)
    check_count("stage", stage, 0)
    if stage >= num_stages:
        raise ValueError(f"stage {stage} is outside range({num_stages})")


def check_bytes(data: bytes) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")


def encode_record(what: str, record: dict[str, Any]) -> bytes:
    if not isinstance(record, dict):
        raise ValueError(f"{what} must be a dict, got {type(record).__name__}")
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-able: {exc}") from exc


def decode_record(key: str, raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise StoreError(f"corrupt record at {key}: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"corrupt record at {key}: expected a JSON object")
    return value


def steps_to_prune(complete_by_step: dict[int, bool], keep: int) -> list[int]:
    """Steps to delete so that only the `keep` newest complete checkpoints (and any incomplete
    one newer than the newest complete) remain."""
    complete = sorted((s for s, done in complete_by_step.items() if done), reverse=True)
    if not complete:
        return []  # nothing to fall back on: leave every partial checkpoint alone
    kept = set(complete[:keep])
    return sorted(s for s in complete_by_step if s not in kept and s < complete[0])


def blob_prefix_range(job_id: str) -> tuple[str, str]:
    """Bounds [lo, hi) of the blob keys under `job/{job_id}/` ('0' is the code point after '/')."""
    return f"job/{job_id}/", f"job/{job_id}0"
