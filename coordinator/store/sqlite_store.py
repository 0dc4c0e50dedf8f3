"""`SQLiteStore`: the embedded state store, one SQLite file (stdlib only)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordinator.store.interface import (
    ACCEPTED_URLS,
    EVENTS_KEPT,
    StateStore,
    StoreError,
    blob_prefix_range,
    check_bytes,
    check_count,
    check_id,
    check_part,
    created_at_of,
    decode_record,
    encode_record,
    record_id,
    steps_to_prune,
)

# 2: metrics are keyed by (job, step, stage, replica); a version 1 file is migrated.
_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, created_at REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_creation ON jobs (created_at, job_id);
CREATE TABLE IF NOT EXISTS plans (job_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS exclusions (worker_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, stage INTEGER NOT NULL,
    replica INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, step, stage, replica)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, num_stages INTEGER NOT NULL,
    complete INTEGER NOT NULL, PRIMARY KEY (job_id, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint_parts (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, stage INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (job_id, step, stage));
CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    scope TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (scope, seq)) WITHOUT ROWID;
"""


class SQLiteStore(StateStore):
    """The embedded store: one SQLite file in WAL mode, shared by threads under one lock."""

    def __init__(self, path: str, *, busy_timeout_s: float = 10.0) -> None:
        if not path:
            raise StoreError(f"no SQLite file named; expected {ACCEPTED_URLS}")
        self.url = "sqlite://:memory:" if path == ":memory:" else f"sqlite:///{path}"
        if path != ":memory:":
            parent = Path(path).expanduser().parent
            if not parent.is_dir():
                raise StoreError(f"cannot open {self.url}: directory {parent} does not exist")
        self._lock = threading.Lock()
        try:
            # isolation_level=None: transactions are opened explicitly in `_transaction`.
            self._conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.url}: {exc}") from exc
        try:
            with self._errors():
                self._conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL: a commit is not fsynced, so a power cut may lose the last
                # commits but never leaves a torn one; a process crash loses nothing.
                self._conn.execute("PRAGMA synchronous=NORMAL")
                self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    def _init_schema(self) -> None:
        with self._transaction(write=True) as db:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise StoreError(
                    f"{self.url} has schema version {version}; this code reads up to "
                    f"{_SCHEMA_VERSION}"
                )
            if version == 1:
                # Version 1 keyed metrics by (job, step, stage): its records are replica 0's.
                db.execute("ALTER TABLE metrics RENAME TO metrics_v1")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version == 1:
                db.execute(
                    "INSERT INTO metrics SELECT job_id, step, stage, 0, body FROM metrics_v1"
                )
                db.execute("DROP TABLE metrics_v1")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"state store {self.url}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so a read-then-write never fails halfway
        # on a lock held by another process; a plain BEGIN gives reads one snapshot.
        with self._lock, self._errors():
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT: the next BEGIN must not find a transaction open.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _one(self, table: str, id_column: str, key: str) -> dict[str, Any] | None:
        with self._transaction(write=False) as db:
            row = db.execute(f"SELECT body FROM {table} WHERE {id_column} = ?", (key,)).fetchone()
        return None if row is None else decode_record(f"{table}[{key!r}]", row[0])

    # jobs and plans

    def put_job(self, job: dict[str, Any]) -> None:
        job_id, created = record_id(job, "job_id"), created_at_of(job)
        body = encode_record("job", job)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO jobs VALUES (?, ?, ?)", (job_id, created, body.decode()))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("jobs", "job_id", job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT job_id, body FROM jobs ORDER BY created_at, job_id")
            return [decode_record(f"jobs[{job_id!r}]", body) for job_id, body in rows.fetchall()]

    def delete_job(self, job_id: str) -> None:
        check_id("job_id", job_id)
        lo, hi = blob_prefix_range(job_id)
        with self._transaction(write=True) as db:
            for table in ("jobs", "plans", "metrics", "checkpoints", "checkpoint_parts"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM events WHERE scope = ?", (job_id,))
            db.execute("DELETE FROM blobs WHERE key >= ? AND key < ?", (lo, hi))

    def put_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        check_id("job_id", job_id)
        body = encode_record("plan", plan)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO plans VALUES (?, ?)", (job_id, body.decode()))

    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        return self._one("plans", "job_id", job_id)

    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        job_id, created = record_id(job, "job_id"), created_at_of(job)
        job_body, plan_body = encode_record("job", job), encode_record("plan", plan)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO jobs VALUES (?, ?, ?)", (job_id, created, job_body.decode()))
            db.execute("REPLACE INTO plans VALUES (?, ?)", (job_id, plan_body.decode()))

    # workers

    def put_worker(self, worker: dict[str, Any]) -> None:
        worker_id, body = record_id(worker, "worker_id"), encode_record("worker", worker)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO workers VALUES (?, ?)", (worker_id, body.decode()))

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        return self._one("workers", "worker_id", worker_id)

    def list_workers(self) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT worker_id, body FROM workers ORDER BY worker_id").fetchall()
        return [decode_record(f"workers[{worker_id!r}]", body) for worker_id, body in rows]

    def delete_worker(self, worker_id: str) -> None:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    # exclusions (the table is created by `_SCHEMA` in a file of any version: no migration)

    def put_exclusion(self, exclusion: dict[str, Any]) -> None:
        worker_id = record_id(exclusion, "worker_id")
        body = encode_record("exclusion", exclusion)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO exclusions VALUES (?, ?)", (worker_id, body.decode()))

    def list_exclusions(self) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT worker_id, body FROM exclusions ORDER BY worker_id")
            return [decode_record(f"exclusions[{w!r}]", body) for w, body in rows.fetchall()]

    def delete_exclusion(self, worker_id: str) -> None:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM exclusions WHERE worker_id = ?", (worker_id,))

    # metrics

    def put_metric(
        self, job_id: str, step: int, stage: int, record: dict[str, Any], *, replica: int = 0
    ) -> None:
        check_id("job_id", job_id)
        check_count("step", step, 0)
        check_count("stage", stage, 0)
        check_count("replica", replica, 0)
        body = encode_record("metric record", record)
        with self._transaction(write=True) as db:
            db.execute(
                "REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)",
                (job_id, step, stage, replica, body.decode()),
            )

    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT step, stage, replica, body FROM metrics WHERE job_id = ? AND step >= ? "
                "ORDER BY step, stage, replica",
                (job_id, since_step),
            ).fetchall()
        return [
            {
                **decode_record(f"metrics[{job_id!r}, {step}, {stage}, {replica}]", body),
                "step": step,
                "stage": stage,
                **({"replica": replica} if replica else {}),
            }
            for step, stage, replica, body in rows
        ]

    # events

    def put_event(self, scope: str, record: dict[str, Any]) -> int:
        check_id("scope", scope)
        body = encode_record("event", record)
        with self._transaction(write=True) as db:
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM events WHERE scope = ?", (scope,)
            ).fetchone()
            seq = int(last) + 1
            db.execute("INSERT INTO events VALUES (?, ?, ?)", (scope, seq, body.decode()))
            db.execute(
                "DELETE FROM events WHERE scope = ? AND seq <= ?", (scope, seq - EVENTS_KEPT)
            )
        return seq

    def events(self, scope: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        check_count("after_seq", after_seq, 0)
        check_count("limit", limit, 1)
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT seq, body FROM events WHERE scope = ? AND seq > ? ORDER BY seq LIMIT ?",
                (scope, after_seq, limit),
            ).fetchall()
        return [
            {**decode_record(f"events[{scope!r}, {seq}]", body), "seq": seq} for seq, body in rows
        ]

    # checkpoints

    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        check_id("job_id", job_id)
        check_part(step, stage, num_stages)
        check_bytes(data)
        key = (job_id, step)
        with self._transaction(write=True) as db:
            row = db.execute(
                "SELECT num_stages FROM checkpoints WHERE job_id = ? AND step = ?", key
            ).fetchone()
            if row is not None and row[0] != num_stages:
                db.execute("DELETE FROM checkpoint_parts WHERE job_id = ? AND step = ?", key)
            db.execute("REPLACE INTO checkpoint_parts VALUES (?, ?, ?, ?)", (*key, stage, data))
            (present,) = db.execute(
                "SELECT COUNT(*) FROM checkpoint_parts WHERE job_id = ? AND step = ?", key
            ).fetchone()
            complete = present == num_stages
            db.execute("REPLACE INTO checkpoints VALUES (?, ?, ?, ?)", (*key, num_stages, complete))
        return complete

    def checkpoint_parts(self, job_id: str, step: int) -> list[bytes]:
        key = (job_id, step)
        with self._transaction(write=False) as db:
            row = db.execute(
                "SELECT num_stages, complete FROM checkpoints WHERE job_id = ? AND step = ?", key
            ).fetchone()
            parts = db.execute(
                "SELECT data FROM checkpoint_parts WHERE job_id = ? AND step = ? ORDER BY stage",
                key,
            ).fetchall()
        if row is None:
            raise StoreError(f"job {job_id!r} has no checkpoint at step {step}")
        if not row[1] or len(parts) != row[0]:
            raise StoreError(
                f"checkpoint of job {job_id!r} at step {step} is not complete "
                f"({len(parts)} of {row[0]} parts)"
            )
        return [bytes(data) for (data,) in parts]

    def latest_checkpoint(self, job_id: str) -> int | None:
        with self._transaction(write=False) as db:
            (step,) = db.execute(
                "SELECT MAX(step) FROM checkpoints WHERE job_id = ? AND complete", (job_id,)
            ).fetchone()
        return None if step is None else int(step)

    def prune_checkpoints(self, job_id: str, keep: int) -> None:
        check_count("keep", keep, 1)
        with self._transaction(write=True) as db:
            rows = db.execute(
                "SELECT step, complete FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchall()
            for step in steps_to_prune({s: bool(c) for s, c in rows}, keep):
                for table in ("checkpoints", "checkpoint_parts"):
                    db.execute(f"DELETE FROM {table} WHERE job_id = ? AND step = ?", (job_id, step))

    def discard_checkpoints_after(self, job_id: str, step: int) -> None:
        with self._transaction(write=True) as db:
            for table in ("checkpoints", "checkpoint_parts"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ? AND step > ?", (job_id, step))

    # blobs

    def put_blob(self, key: str, data: bytes) -> None:
        check_id("blob key", key)
        check_bytes(data)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO blobs VALUES (?, ?)", (key, data))

    def get_blob(self, key: str) -> bytes | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT data FROM blobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
