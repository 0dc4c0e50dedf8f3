"""`TimedStore`: any state store, with the time each call takes handed to an observer.

The coordinator wraps its store in one so the store's latency is visible in its metrics
(`coordinator.dashboard.prometheus`). Every method is delegated by name, so mypy checks
each against `StateStore`; a call that raises is timed too (a store timing out is exactly
what an operator wants to see).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from coordinator.store.interface import StateStore

P = ParamSpec("P")
R = TypeVar("R")

# What the wrapper reports: the method's name and the seconds it took.
StoreObserver = Callable[[str, float], None]


def _ignore(op: str, seconds: float) -> None:
    """The observer of a store nobody watches yet."""


class TimedStore(StateStore):
    """`inner`, with `observe(method name, seconds)` called after every call.

    `observe` may be set after construction: the coordinator's metrics are made from the
    job manager, which needs the store first.
    """

    def __init__(self, inner: StateStore, observe: StoreObserver | None = None) -> None:
        self.inner = inner
        self.observe: StoreObserver = observe or _ignore
        self.url = inner.url

    def _timed(self, op: str, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.observe(op, time.perf_counter() - start)

    # -- jobs ------------------------------------------------------------------------------

    def put_job(self, job: dict[str, Any]) -> None:
        self._timed("put_job", self.inner.put_job, job)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._timed("get_job", self.inner.get_job, job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._timed("list_jobs", self.inner.list_jobs)

    def delete_job(self, job_id: str) -> None:
        self._timed("delete_job", self.inner.delete_job, job_id)

    # -- plans -----------------------------------------------------------------------------

    def put_plan(self, job_id: str, plan: dict[str, Any]) -> None:
        self._timed("put_plan", self.inner.put_plan, job_id, plan)

    def get_plan(self, job_id: str) -> dict[str, Any] | None:
        return self._timed("get_plan", self.inner.get_plan, job_id)

    def put_job_and_plan(self, job: dict[str, Any], plan: dict[str, Any]) -> None:
        self._timed("put_job_and_plan", self.inner.put_job_and_plan, job, plan)

    # -- workers ---------------------------------------------------------------------------

    def put_worker(self, worker: dict[str, Any]) -> None:
        self._timed("put_worker", self.inner.put_worker, worker)

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        return self._timed("get_worker", self.inner.get_worker, worker_id)

    def list_workers(self) -> list[dict[str, Any]]:
        return self._timed("list_workers", self.inner.list_workers)

    def delete_worker(self, worker_id: str) -> None:
        self._timed("delete_worker", self.inner.delete_worker, worker_id)

    # -- exclusions ------------------------------------------------------------------------

    def put_exclusion(self, exclusion: dict[str, Any]) -> None:
        self._timed("put_exclusion", self.inner.put_exclusion, exclusion)

    def list_exclusions(self) -> list[dict[str, Any]]:
        return self._timed("list_exclusions", self.inner.list_exclusions)

    def delete_exclusion(self, worker_id: str) -> None:
        self._timed("delete_exclusion", self.inner.delete_exclusion, worker_id)

    # -- metrics ---------------------------------------------------------------------------

    def put_metric(
        self, job_id: str, step: int, stage: int, record: dict[str, Any], *, replica: int = 0
    ) -> None:
        self._timed(
            "put_metric", self.inner.put_metric, job_id, step, stage, record, replica=replica
        )

    def metrics(self, job_id: str, since_step: int = 0) -> list[dict[str, Any]]:
        return self._timed("metrics", self.inner.metrics, job_id, since_step)

    # -- events ----------------------------------------------------------------------------

    def put_event(self, scope: str, record: dict[str, Any]) -> int:
        return self._timed("put_event", self.inner.put_event, scope, record)

    def events(self, scope: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self._timed("events", self.inner.events, scope, after_seq, limit)

    # -- checkpoints -----------------------------------------------------------------------

    def put_checkpoint_part(
        self, job_id: str, step: int, stage: int, num_stages: int, data: bytes
    ) -> bool:
        return self._timed(
            "put_checkpoint_part",
            self.inner.put_checkpoint_part,
            job_id,
            step,
            stage,
            num_stages,
            data,
        )

    def checkpoint_parts(self, job_id: str, step: int) -> list[bytes]:
        return self._timed("checkpoint_parts", self.inner.checkpoint_parts, job_id, step)

    def latest_checkpoint(self, job_id: str) -> int | None:
        return self._timed("latest_checkpoint", self.inner.latest_checkpoint, job_id)

    def prune_checkpoints(self, job_id: str, keep: int) -> None:
        self._timed("prune_checkpoints", self.inner.prune_checkpoints, job_id, keep)

    def discard_checkpoints_after(self, job_id: str, step: int) -> None:
        self._timed("discard_checkpoints_after", self.inner.discard_checkpoints_after, job_id, step)

    # -- blobs -----------------------------------------------------------------------------

    def put_blob(self, key: str, data: bytes) -> None:
        self._timed("put_blob", self.inner.put_blob, key, data)

    def get_blob(self, key: str) -> bytes | None:
        return self._timed("get_blob", self.inner.get_blob, key)

    def close(self) -> None:
        self._timed("close", self.inner.close)
