"""The coordinator's durable state: jobs, plans, workers, metrics, checkpoints and blobs.

One interface, `StateStore`, with two implementations: `SQLiteStore` (the embedded default,
stdlib only) and `RedisStore` (needs the `redis` package, imported only when used).
`open_store(url)` picks one from a URL.

Every write that touches more than one key or row is atomic (an SQLite transaction, a Redis
MULTI/EXEC), so a coordinator killed at any instant leaves either the old state or the new
one. Records are JSON-able dicts stored as UTF-8 JSON; checkpoint parts and blobs are raw
bytes. Arguments that break the contract (a record without its id, a stage outside
`range(num_stages)`) raise `ValueError` and write nothing; trouble with the store itself
(unreachable, corrupt, bad URL) raises `StoreError`.
"""

from __future__ import annotations

import abc
import contextlib
import json
import math
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////absolute/path.db, sqlite://:memory:, "
    "a bare file path, or redis://[:password@]host[:port][/db]"
)


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

    # -- metrics ---------------------------------------------------------------------------

    @abc.abstractmethod
    def put_metric(self, job_id: str, step: int, stage: int, record: dict[str, Any]) -> None:
        """Store the metrics of one (step, stage), replacing an earlier record of the same pair."""

    @abc.abstractmethod
    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        """Records with step >= since_step ordered by (step, stage), each with "step"/"stage"."""

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


def open_store(url: str) -> StateStore:
    """Open the store a URL names (see `ACCEPTED_URLS`); a bare path means an SQLite file.

    Raises StoreError for a URL of another form, a missing directory, or a Redis that does not
    answer.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"empty state store URL {url!r}; expected {ACCEPTED_URLS}")
    if url in ("sqlite://:memory:", "sqlite:///:memory:"):
        return SQLiteStore(":memory:")
    if url.startswith("sqlite:///"):
        # As in SQLAlchemy: all after the third slash is the path, so a fourth makes it absolute.
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if url.startswith("sqlite:"):
        raise StoreError(f"bad SQLite URL {url!r}: put three slashes before the path")
    if url.startswith("redis://"):
        return RedisStore(url)
    if "://" in url:
        raise StoreError(f"unsupported state store URL {url!r}; expected {ACCEPTED_URLS}")
    return SQLiteStore(url)


# -- shared helpers --------------------------------------------------------------------------


def _record_id(record: dict[str, Any], field: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a dict, got {type(record).__name__}")
    value = record.get(field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"record needs a non-empty string {field!r}, got {value!r}")
    return value


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _created_at(job: dict[str, Any]) -> float:
    value = job.get("created_at", 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"job created_at must be a finite number, got {value!r}")
    return float(value)


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_part(step: int, stage: int, num_stages: int) -> None:
    _check_count("step", step, 0)
    _check_count("num_stages", num_stages, 1)
    _check_count("stage", stage, 0)
    if stage >= num_stages:
        raise ValueError(f"stage {stage} is outside range({num_stages})")


def _check_bytes(data: bytes) -> None:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"data must be bytes, got {type(data).__name__}")


def _encode(what: str, record: dict[str, Any]) -> bytes:
    if not isinstance(record, dict):
        raise ValueError(f"{what} must be a dict, got {type(record).__name__}")
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-able: {exc}") from exc


def _decode(key: str, raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise StoreError(f"corrupt record at {key}: {exc}") from exc
    if not isinstance(value, dict):
        raise StoreError(f"corrupt record at {key}: expected a JSON object")
    return value


def _steps_to_prune(complete_by_step: dict[int, bool], keep: int) -> list[int]:
    """Steps to delete so that only the `keep` newest complete checkpoints (and any incomplete
    one newer than the newest complete) remain."""
    complete = sorted((s for s, done in complete_by_step.items() if done), reverse=True)
    if not complete:
        return []  # nothing to fall back on: leave every partial checkpoint alone
    kept = set(complete[:keep])
    return sorted(s for s in complete_by_step if s not in kept and s < complete[0])


def _blob_prefix_range(job_id: str) -> tuple[str, str]:
    """Bounds [lo, hi) of the blob keys under `job/{job_id}/` ('0' is the code point after '/')."""
    return f"job/{job_id}/", f"job/{job_id}0"


# -- SQLite ----------------------------------------------------------------------------------

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, created_at REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_creation ON jobs (created_at, job_id);
CREATE TABLE IF NOT EXISTS plans (job_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, stage INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, step, stage)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, num_stages INTEGER NOT NULL,
    complete INTEGER NOT NULL, PRIMARY KEY (job_id, step)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint_parts (
    job_id TEXT NOT NULL, step INTEGER NOT NULL, stage INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (job_id, step, stage));
CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, data BLOB NOT NULL);
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
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
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
        return None if row is None else _decode(f"{table}[{key!r}]", row[0])

    # jobs and plans

    def put_job(self, job: dict[str, Any]) -> None:
        job_id, created, body = _record_id(job, "job_id"), _created_at(job), _encode("job", job)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO jobs VALUES (?, ?, ?)", (job_id, created, body.decode()))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("jobs", "job_id", job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT job_id, body FROM jobs ORDER BY created_at, job_id")
            return [_decode(f"jobs[{job_id!r}]", body) for job_id, body in rows.fetchall()]

    def delete_job(self, job_id: str) -> None:
        _check_id("job_id", job_id)
        lo, hi = _blob_prefix_range(job_id)
        with self._transaction(write=True) as db:
            for table in ("jobs", "plans", "metrics", "checkpoints", "checkpoint_parts"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM blobs WHERE key >= ? AND key < ?", (lo, hi))

    def put_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        _check_id("job_id", job_id)
        body = _encode("plan", plan)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO plans VALUES (?, ?)", (job_id, body.decode()))

    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        return self._one("plans", "job_id", job_id)

    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        job_id, created = _record_id(job, "job_id"), _created_at(job)
        job_body, plan_body = _encode("job", job), _encode("plan", plan)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO jobs VALUES (?, ?, ?)", (job_id, created, job_body.decode()))
            db.execute("REPLACE INTO plans VALUES (?, ?)", (job_id, plan_body.decode()))

    # workers

    def put_worker(self, worker: dict[str, Any]) -> None:
        worker_id, body = _record_id(worker, "worker_id"), _encode("worker", worker)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO workers VALUES (?, ?)", (worker_id, body.decode()))

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        return self._one("workers", "worker_id", worker_id)

    def list_workers(self) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute("SELECT worker_id, body FROM workers ORDER BY worker_id").fetchall()
        return [_decode(f"workers[{worker_id!r}]", body) for worker_id, body in rows]

    def delete_worker(self, worker_id: str) -> None:
        with self._transaction(write=True) as db:
            db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    # metrics

    def put_metric(self, job_id: str, step: int, stage: int, record: dict[str, Any]) -> None:
        _check_id("job_id", job_id)
        _check_count("step", step, 0)
        _check_count("stage", stage, 0)
        body = _encode("metric record", record)
        with self._transaction(write=True) as db:
            db.execute(
                "REPLACE INTO metrics VALUES (?, ?, ?, ?)", (job_id, step, stage, body.decode())
            )

    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        with self._transaction(write=False) as db:
            rows = db.execute(
                "SELECT step, stage, body FROM metrics WHERE job_id = ? AND step >= ? "
                "ORDER BY step, stage",
                (job_id, since_step),
            ).fetchall()
        return [
            {**_decode(f"metrics[{job_id!r}, {step}, {stage}]", body), "step": step, "stage": stage}
            for step, stage, body in rows
        ]

    # checkpoints

    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        _check_id("job_id", job_id)
        _check_part(step, stage, num_stages)
        _check_bytes(data)
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
        _check_count("keep", keep, 1)
        with self._transaction(write=True) as db:
            rows = db.execute(
                "SELECT step, complete FROM checkpoints WHERE job_id = ?", (job_id,)
            ).fetchall()
            for step in _steps_to_prune({s: bool(c) for s, c in rows}, keep):
                for table in ("checkpoints", "checkpoint_parts"):
                    db.execute(f"DELETE FROM {table} WHERE job_id = ? AND step = ?", (job_id, step))

    def discard_checkpoints_after(self, job_id: str, step: int) -> None:
        with self._transaction(write=True) as db:
            for table in ("checkpoints", "checkpoint_parts"):
                db.execute(f"DELETE FROM {table} WHERE job_id = ? AND step > ?", (job_id, step))

    # blobs

    def put_blob(self, key: str, data: bytes) -> None:
        _check_id("blob key", key)
        _check_bytes(data)
        with self._transaction(write=True) as db:
            db.execute("REPLACE INTO blobs VALUES (?, ?)", (key, data))

    def get_blob(self, key: str) -> bytes | None:
        with self._transaction(write=False) as db:
            row = db.execute("SELECT data FROM blobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- Redis -----------------------------------------------------------------------------------

# An upload staged for `put_checkpoint_part` outlives a crash by at most this long.
_STAGING_TTL_S = 24 * 3600


class RedisStore(StateStore):
    """The store in one Redis database, every key under `prefix` so other data is untouched.

    Layout (the id always comes last, so ids containing ':' cannot collide):
    job:{id} / plan:{id} / worker:{id} JSON, listed by the sorted sets index:jobs (scored by
    created_at) and index:workers; metrics:{job} hash of "step:stage" -> JSON, ordered by
    metric-order:{job}; ckpt-manifest:{job} hash step -> num_stages; ckpt-complete:{job}
    sorted set of complete steps; ckpt-part:{step}:{stage}:{job} and blob:{key} raw bytes,
    blobs listed in index:blobs.
    """

    def __init__(
        self, url: str, *, prefix: str = "archipelago:", socket_timeout_s: float = 2.0
    ) -> None:
        try:
            # Only a Redis deployment needs the package.
            import redis
            from redis.backoff import ExponentialBackoff, NoBackoff
            from redis.retry import Retry
        except ImportError as exc:
            raise StoreError(f"{url!r} needs the 'redis' Python package: {exc}") from exc
        self._redis_error: type[Exception] = redis.RedisError
        self._prefix = prefix
        host, port, db, username, password = _parse_redis_url(url)
        self.url = f"redis://{host}:{port}/{db}"
        self._client: redis.Redis = redis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # No retries for the first PING: a wrong URL should fail in seconds, not after
            # the client's default backoff.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._client.close()
            raise StoreError(f"cannot reach Redis at {self.url}: {exc}") from exc
        # Later commands ride out a short blip (a Redis restart, a dropped connection).
        self._client.set_retry(Retry(ExponentialBackoff(cap=1.0, base=0.1), 3))

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}{kind}:{name}"

    def _part_key(self, job_id: str, step: int, stage: int) -> str:
        return self._key("ckpt-part", f"{step}:{stage}:{job_id}")

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._redis_error as exc:
            raise StoreError(f"state store {self.url}: {exc}") from exc

    def _transaction(self, attempt: Callable[[Pipeline], Any], *watched: str) -> Any:
        """Run `attempt` under WATCH on `watched`, retried until no watched key changed."""
        with self._errors():
            return self._client.transaction(attempt, *watched, value_from_callable=True)

    def _get_record(self, key: str) -> dict[str, Any] | None:
        with self._errors():
            raw = cast("bytes | None", self._client.get(key))
        return None if raw is None else _decode(key, raw)

    def _list_records(self, index: str, kind: str) -> list[dict[str, Any]]:
        with self._errors():
            names = [m.decode() for m in cast("list[bytes]", self._client.zrange(index, 0, -1))]
            keys = [self._key(kind, name) for name in names]
            values = cast("list[bytes | None]", self._client.mget(keys)) if keys else []
        # A record deleted between the two reads is simply not listed.
        return [_decode(k, raw) for k, raw in zip(keys, values, strict=True) if raw is not None]

    def _int(self, key: str, raw: bytes | str | float) -> int:
        try:
            return int(raw)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"corrupt value at {key}: {raw!r} is not an integer") from exc

    # jobs and plans

    def _queue_job(self, pipe: Pipeline, job: dict[str, Any], body: bytes) -> None:
        job_id = job["job_id"]
        pipe.set(self._key("job", job_id), body)
        pipe.zadd(self._key("index", "jobs"), {job_id: _created_at(job)})

    def put_job(self, job: dict[str, Any]) -> None:
        _record_id(job, "job_id")
        _created_at(job)
        body = _encode("job", job)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            self._queue_job(pipe, job, body)
            pipe.execute()

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._get_record(self._key("job", job_id))

    def list_jobs(self) -> list[dict[str, Any]]:
        # The index is scored by created_at; Redis orders equal scores by member bytes, which
        # for UTF-8 is code-point order, the same as SQLite's and Python's string order.
        return self._list_records(self._key("index", "jobs"), "job")

    def delete_job(self, job_id: str) -> None:
        _check_id("job_id", job_id)
        manifest = self._key("ckpt-manifest", job_id)
        blobs = self._key("index", "blobs")
        lo, hi = _blob_prefix_range(job_id)

        def attempt(pipe: Pipeline) -> None:
            steps = cast("dict[bytes, bytes]", pipe.hgetall(manifest))
            parts = [
                self._part_key(job_id, self._int(manifest, step), stage)
                for step, n in steps.items()
                for stage in range(self._int(manifest, n))
            ]
            names = cast("list[bytes]", pipe.zrangebylex(blobs, f"[{lo}", f"({hi}"))
            pipe.multi()
            pipe.delete(
                *(self._key(kind, job_id) for kind in ("job", "plan", "metrics", "metric-order")),
                manifest,
                self._key("ckpt-complete", job_id),
                *parts,
                *(self._key("blob", name.decode()) for name in names),
            )
            pipe.zrem(self._key("index", "jobs"), job_id)
            if names:
                pipe.zrem(blobs, *names)

        # Watching the manifest and the blob index makes a part or blob written meanwhile
        # restart the deletion, so nothing of the job survives it.
        self._transaction(attempt, manifest, blobs)

    def put_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        _check_id("job_id", job_id)
        body = _encode("plan", plan)
        with self._errors():
            self._client.set(self._key("plan", job_id), body)

    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        return self._get_record(self._key("plan", job_id))

    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        job_id = _record_id(job, "job_id")
        _created_at(job)
        job_body, plan_body = _encode("job", job), _encode("plan", plan)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            self._queue_job(pipe, job, job_body)
            pipe.set(self._key("plan", job_id), plan_body)
            pipe.execute()

    # workers

    def put_worker(self, worker: dict[str, Any]) -> None:
        worker_id, body = _record_id(worker, "worker_id"), _encode("worker", worker)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._key("worker", worker_id), body)
            pipe.zadd(self._key("index", "workers"), {worker_id: 0})
            pipe.execute()

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        return self._get_record(self._key("worker", worker_id))

    def list_workers(self) -> list[dict[str, Any]]:
        return self._list_records(self._key("index", "workers"), "worker")

    def delete_worker(self, worker_id: str) -> None:
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._key("worker", worker_id))
            pipe.zrem(self._key("index", "workers"), worker_id)
            pipe.execute()

    # metrics

    def put_metric(self, job_id: str, step: int, stage: int, record: dict[str, Any]) -> None:
        _check_id("job_id", job_id)
        _check_count("step", step, 0)
        _check_count("stage", stage, 0)
        body = _encode("metric record", record)
        # Zero-padded so that members of one step (equal scores) sort by stage.
        field = f"{step:020d}:{stage:010d}"
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self._key("metrics", job_id), field, body)
            pipe.zadd(self._key("metric-order", job_id), {field: step})
            pipe.execute()

    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        key = self._key("metrics", job_id)
        with self._errors():
            fields = cast(
                "list[bytes]",
                self._client.zrangebyscore(self._key("metric-order", job_id), since_step, "+inf"),
            )
            values = cast("list[bytes | None]", self._client.hmget(key, fields)) if fields else []
        records = []
        for field, raw in zip(fields, values, strict=True):
            if raw is None:  # deleted between the two reads
                continue
            step, stage = (self._int(key, part) for part in field.split(b":"))
            records.append(
                {**_decode(f"{key} {field.decode()}", raw), "step": step, "stage": stage}
            )
        return records

    # checkpoints

    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        _check_id("job_id", job_id)
        _check_part(step, stage, num_stages)
        _check_bytes(data)
        manifest = self._key("ckpt-manifest", job_id)
        complete = self._key("ckpt-complete", job_id)
        target = self._part_key(job_id, step, stage)
        staging = self._key("staging", uuid.uuid4().hex)

        def attempt(pipe: Pipeline) -> bool:
            old = cast("bytes | None", pipe.hget(manifest, str(step)))
            old_n = None if old is None else self._int(manifest, old)
            stale = []
            if old_n is not None and old_n != num_stages:
                stale = [self._part_key(job_id, step, s) for s in range(old_n)]
            others = [self._part_key(job_id, step, s) for s in range(num_stages) if s != stage]
            present = 0 if stale or not others else pipe.exists(*others)
            if not pipe.exists(staging):
                raise StoreError(f"staged upload {staging} vanished; write the part again")
            done = present == num_stages - 1
            pipe.multi()
            if stale:
                pipe.delete(*stale)
                pipe.zrem(complete, str(step))
            pipe.rename(staging, target)
            pipe.persist(target)
            pipe.hset(manifest, str(step), str(num_stages))
            if done:
                pipe.zadd(complete, {str(step): step})
            return done

        with self._errors():
            # Upload first, outside the transaction: a retry after a concurrent writer touched
            # the manifest then resends a RENAME, not tens of MB. The TTL reclaims the upload if
            # the coordinator dies before the rename; a half-stored part is never visible.
            self._client.set(staging, bytes(data), ex=_STAGING_TTL_S)
            try:
                # Every part writer (and prune, delete) changes the manifest, so watching it
                # serialises them: two stages finishing together cannot both miss completion.
                return cast("bool", self._transaction(attempt, manifest, staging))
            finally:
                with contextlib.suppress(self._redis_error):
                    self._client.delete(staging)  # a no-op once renamed

    def checkpoint_parts(self, job_id: str, step: int) -> list[bytes]:
        manifest = self._key("ckpt-manifest", job_id)
        with self._errors():
            raw_n = cast("bytes | None", self._client.hget(manifest, str(step)))
            if raw_n is None:
                raise StoreError(f"job {job_id!r} has no checkpoint at step {step}")
            n = self._int(manifest, raw_n)
            pipe = self._client.pipeline(transaction=True)  # one consistent view
            pipe.hget(manifest, str(step))
            pipe.zscore(self._key("ckpt-complete", job_id), str(step))
            pipe.mget([self._part_key(job_id, step, s) for s in range(n)])
            now_n, score, parts = pipe.execute()
        present = [p for p in parts if p is not None]
        if now_n != raw_n or score is None or len(present) != n:
            raise StoreError(
                f"checkpoint of job {job_id!r} at step {step} is not complete "
                f"({len(present)} of {n} parts)"
            )
        return cast("list[bytes]", present)

    def latest_checkpoint(self, job_id: str) -> int | None:
        key = self._key("ckpt-complete", job_id)
        with self._errors():
            top = cast("list[bytes]", self._client.zrevrange(key, 0, 0))
        return self._int(key, top[0]) if top else None

    def prune_checkpoints(self, job_id: str, keep: int) -> None:
        _check_count("keep", keep, 1)
        manifest = self._key("ckpt-manifest", job_id)
        complete = self._key("ckpt-complete", job_id)

        def attempt(pipe: Pipeline) -> None:
            stages = {
                self._int(manifest, s): self._int(manifest, n)
                for s, n in cast("dict[bytes, bytes]", pipe.hgetall(manifest)).items()
            }
            done = {
                self._int(complete, s) for s in cast("list[bytes]", pipe.zrange(complete, 0, -1))
            }
            doomed = _steps_to_prune({s: s in done for s in stages}, keep)
            pipe.multi()
            if not doomed:
                return
            names = [str(s) for s in doomed]
            pipe.delete(*(self._part_key(job_id, s, k) for s in doomed for k in range(stages[s])))
            pipe.hdel(manifest, *names)
            pipe.zrem(complete, *names)

        self._transaction(attempt, manifest, complete)

    def discard_checkpoints_after(self, job_id: str, step: int) -> None:
        manifest = self._key("ckpt-manifest", job_id)
        complete = self._key("ckpt-complete", job_id)

        def attempt(pipe: Pipeline) -> None:
            stages = {
                self._int(manifest, s): self._int(manifest, n)
                for s, n in cast("dict[bytes, bytes]", pipe.hgetall(manifest)).items()
            }
            doomed = [s for s in stages if s > step]
            pipe.multi()
            if not doomed:
                return
            names = [str(s) for s in doomed]
            pipe.delete(*(self._part_key(job_id, s, k) for s in doomed for k in range(stages[s])))
            pipe.hdel(manifest, *names)
            pipe.zrem(complete, *names)

        self._transaction(attempt, manifest, complete)

    # blobs

    def put_blob(self, key: str, data: bytes) -> None:
        _check_id("blob key", key)
        _check_bytes(data)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._key("blob", key), bytes(data))
            # Indexed by name (score 0) so delete_job finds a job's blobs by a lexical range.
            pipe.zadd(self._key("index", "blobs"), {key: 0})
            pipe.execute()

    def get_blob(self, key: str) -> bytes | None:
        with self._errors():
            return cast("bytes | None", self._client.get(self._key("blob", key)))

    def close(self) -> None:
        self._client.close()


def _parse_redis_url(url: str) -> tuple[str, int, int, str | None, str | None]:
    """(host, port, db, username, password) of a redis:// URL."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise StoreError(f"bad Redis URL ({exc}); expected {ACCEPTED_URLS}") from exc
    path = parts.path.strip("/") or "0"
    if parts.query or parts.fragment or not path.isdigit():
        # The URL may hold a password: name only the part that is wrong.
        raise StoreError(
            f"bad Redis URL: database {path!r} is not a number or options were given; "
            f"expected {ACCEPTED_URLS}"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", port, int(path), username, password
