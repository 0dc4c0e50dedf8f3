"""`RedisStore`: the state store in one Redis database (needs the `redis` package, imported
only when a Redis store is opened)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from coordinator.store.interface import (
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
from coordinator.store.redis_url import parse_redis_url

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

# An upload staged for `put_checkpoint_part` outlives a crash by at most this long.
_STAGING_TTL_S = 24 * 3600


class RedisStore(StateStore):
    """The store in one Redis database, every key under `prefix` so other data is untouched.

    Layout (the id always comes last, so ids containing ':' cannot collide):
    job:{id} / plan:{id} / worker:{id} / exclusion:{id} JSON, listed by the sorted sets
    index:jobs (scored by created_at), index:workers and index:exclusions; metrics:{job}
    hash of "step:stage" (replica 0) or "step:stage:replica" -> JSON, ordered by
    metric-order:{job}; ckpt-manifest:{job} hash step -> num_stages; ckpt-complete:{job}
    sorted set of complete steps;
    ckpt-part:{step}:{stage}:{job} and blob:{key} raw bytes, blobs listed in index:blobs.
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
        target = parse_redis_url(url)
        scheme = "rediss" if target.tls is not None else "redis"
        self.url = f"{scheme}://{target.host}:{target.port}/{target.db}"
        tls: dict[str, Any] = {}
        if target.tls is not None:
            # The server's certificate is always verified, against `ca` when given (a
            # self-run Redis) or the system's store; a client certificate when Redis asks.
            tls = {
                "ssl": True,
                "ssl_cert_reqs": "required",
                "ssl_check_hostname": True,
                "ssl_ca_certs": target.tls.ca,
                "ssl_certfile": target.tls.cert,
                "ssl_keyfile": target.tls.key,
            }
        self._client: redis.Redis = redis.Redis(
            host=target.host,
            port=target.port,
            db=target.db,
            username=target.username,
            password=target.password,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            # No retries for the first PING: a wrong URL should fail in seconds, not after
            # the client's default backoff.
            retry=Retry(NoBackoff(), 0),
            **tls,
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
        return None if raw is None else decode_record(key, raw)

    def _list_records(self, index: str, kind: str) -> list[dict[str, Any]]:
        with self._errors():
            names = [m.decode() for m in cast("list[bytes]", self._client.zrange(index, 0, -1))]
            keys = [self._key(kind, name) for name in names]
            values = cast("list[bytes | None]", self._client.mget(keys)) if keys else []
        # A record deleted between the two reads is simply not listed.
        return [
            decode_record(k, raw) for k, raw in zip(keys, values, strict=True) if raw is not None
        ]

    def _int(self, key: str, raw: bytes | str | float) -> int:
        try:
            return int(raw)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"corrupt value at {key}: {raw!r} is not an integer") from exc

    # jobs and plans

    def _queue_job(self, pipe: Pipeline, job: dict[str, Any], body: bytes) -> None:
        job_id = job["job_id"]
        pipe.set(self._key("job", job_id), body)
        pipe.zadd(self._key("index", "jobs"), {job_id: created_at_of(job)})

    def put_job(self, job: dict[str, Any]) -> None:
        record_id(job, "job_id")
        created_at_of(job)
        body = encode_record("job", job)
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
        check_id("job_id", job_id)
        manifest = self._key("ckpt-manifest", job_id)
        blobs = self._key("index", "blobs")
        lo, hi = blob_prefix_range(job_id)

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
                *(
                    self._key(kind, job_id)
                    for kind in ("job", "plan", "metrics", "metric-order", "events", "event-seq")
                ),
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
        check_id("job_id", job_id)
        body = encode_record("plan", plan)
        with self._errors():
            self._client.set(self._key("plan", job_id), body)

    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        return self._get_record(self._key("plan", job_id))

    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        job_id = record_id(job, "job_id")
        created_at_of(job)
        job_body, plan_body = encode_record("job", job), encode_record("plan", plan)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            self._queue_job(pipe, job, job_body)
            pipe.set(self._key("plan", job_id), plan_body)
            pipe.execute()

    # workers

    def put_worker(self, worker: dict[str, Any]) -> None:
        worker_id, body = record_id(worker, "worker_id"), encode_record("worker", worker)
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

    # exclusions

    def put_exclusion(self, exclusion: dict[str, Any]) -> None:
        worker_id = record_id(exclusion, "worker_id")
        body = encode_record("exclusion", exclusion)
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._key("exclusion", worker_id), body)
            pipe.zadd(self._key("index", "exclusions"), {worker_id: 0})
            pipe.execute()

    def list_exclusions(self) -> list[dict[str, Any]]:
        return self._list_records(self._key("index", "exclusions"), "exclusion")

    def delete_exclusion(self, worker_id: str) -> None:
        with self._errors():
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._key("exclusion", worker_id))
            pipe.zrem(self._key("index", "exclusions"), worker_id)
            pipe.execute()

    # metrics

    def put_metric(
        self, job_id: str, step: int, stage: int, record: dict[str, Any], *, replica: int = 0
    ) -> None:
        check_id("job_id", job_id)
        check_count("step", step, 0)
        check_count("stage", stage, 0)
        check_count("replica", replica, 0)
        body = encode_record("metric record", record)
        # Zero-padded so that members of one step (equal scores) sort by stage, then replica;
        # replica 0 keeps the field of a single pipeline, so earlier records stay its own.
        field = f"{step:020d}:{stage:010d}" + (f":{replica:010d}" if replica else "")
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
            step, stage, *replica = (self._int(key, part) for part in field.split(b":"))
            record = {**decode_record(f"{key} {field.decode()}", raw), "step": step, "stage": stage}
            if replica and replica[0]:
                record["replica"] = replica[0]
            records.append(record)
        return records

    # events

    def put_event(self, scope: str, record: dict[str, Any]) -> int:
        check_id("scope", scope)
        body = encode_record("event", record)
        log = self._key("events", scope)
        with self._errors():
            seq = int(self._client.incr(self._key("event-seq", scope)))
            # The member leads with its zero-padded number so that equal bodies stay distinct.
            pipe = self._client.pipeline(transaction=True)
            pipe.zadd(log, {f"{seq:020d}:".encode() + body: seq})
            pipe.zremrangebyscore(log, "-inf", seq - EVENTS_KEPT)
            pipe.execute()
        return seq

    def events(self, scope: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        check_count("after_seq", after_seq, 0)
        check_count("limit", limit, 1)
        log = self._key("events", scope)
        with self._errors():
            members = cast(
                "list[bytes]",
                self._client.zrangebyscore(log, f"({after_seq}", "+inf", start=0, num=limit),
            )
        out = []
        for member in members:
            head, _, body = member.partition(b":")
            seq = self._int(log, head)
            out.append({**decode_record(f"{log} {seq}", body), "seq": seq})
        return out

    # checkpoints

    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        check_id("job_id", job_id)
        check_part(step, stage, num_stages)
        check_bytes(data)
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
        check_count("keep", keep, 1)
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
            doomed = steps_to_prune({s: s in done for s in stages}, keep)
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
        check_id("blob key", key)
        check_bytes(data)
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
