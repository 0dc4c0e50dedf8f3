"""Reading the store for the dashboard a little at a time: a job's step metrics from the
step after the last one seen, an event log from the event after the last one seen, each at
most every REFRESH_S however many pages ask."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from coordinator.job_record import Job
from coordinator.jobs import JobManager

# How often a job's metrics or an event log is read again, at most.
REFRESH_S = 0.5
# Events kept of each log (the newest).
TIMELINE = 200


@dataclass
class EventFeed:
    """The newest events of one scope, read incrementally."""

    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TIMELINE))
    last_seq: int = 0
    checked: float = 0.0


@dataclass
class JobRecords:
    """A job's stored step metrics by (step, stage, replica), read incrementally; reset
    when the job is planned again (a resumed plan rewrites the steps after its checkpoint)."""

    epoch: int = -1
    records: dict[tuple[int, int, int], dict[str, Any]] = field(default_factory=dict)
    next_step: int = 0
    checked: float = 0.0


class StoreFeeds:
    """The event logs and step metrics the dashboard has read so far."""

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self._feeds: dict[str, EventFeed] = {}
        self._reading: dict[str, asyncio.Lock] = {}

    async def read(self, job: Job, held: JobRecords, from_step: int = 0) -> None:
        """Bring `held` up to date with the store (at most every REFRESH_S), reading no step
        before `from_step`."""
        now = time.monotonic()
        if held.epoch == job.epoch and now - held.checked < REFRESH_S:
            return
        lock = self._reading.setdefault(job.job_id, asyncio.Lock())
        async with lock:
            if held.epoch != job.epoch:
                held.records, held.next_step, held.epoch = {}, 0, job.epoch
            held.next_step = max(held.next_step, from_step)
            rows = await self.manager.metrics(job.job_id, held.next_step)
            for r in rows:
                held.records[(int(r["step"]), int(r["stage"]), int(r.get("replica", 0)))] = r
            if rows:
                # The newest step may still lack some stages' records: read it again.
                held.next_step = max(int(r["step"]) for r in rows)
            held.checked = time.monotonic()

    async def events(self, scope: str) -> list[dict[str, Any]]:
        """The newest events of `scope`, oldest first."""
        feed = self._feeds.setdefault(scope, EventFeed())
        log = self.manager.events
        if time.monotonic() - feed.checked < REFRESH_S:
            return list(feed.events)
        while True:
            batch = await log.since(scope, feed.last_seq, 500)
            feed.events.extend(batch)
            if batch:
                feed.last_seq = int(batch[-1]["seq"])
            if len(batch) < 500:
                break
        feed.checked = time.monotonic()
        return list(feed.events)
