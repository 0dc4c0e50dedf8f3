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
# Steps of bytes sent kept per stage (a cut link's measured bytes are their mean).
SENT_STEPS = 20


@dataclass
class EventFeed:
    """The newest events of one scope, read incrementally."""

    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=TIMELINE))
    last_seq: int = 0
    checked: float = 0.0


@dataclass
class JobRecords:
    """What the dashboard keeps of a job's stored step metrics, read incrementally and
    compactly (a long job has a record per step, stage and replica; only these figures are
    kept): the speaker's loss points, each (stage, replica)'s newest bytes sent, and replica
    0's bytes sent by stage over its last steps. Reset when the job is planned again (a
    resumed plan rewrites the steps after its checkpoint)."""

    epoch: int = -1
    next_step: int = 0
    checked: float = 0.0
    # step -> (loss, wall-clock time, step seconds), the speaker's last stage's reports, in
    # step order (records are read in step order, each read starting at the newest step).
    losses: dict[int, tuple[float, float, float]] = field(default_factory=dict)
    # (stage, replica) -> (step, bytes sent) of its newest record.
    newest: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # stage -> {step: bytes sent} of replica 0 in this epoch, the last SENT_STEPS steps.
    sent: dict[int, dict[int, int]] = field(default_factory=dict)

    def reset(self, epoch: int) -> None:
        """Forget everything: the job has a new plan, `epoch`."""
        self.epoch, self.next_step, self.checked = epoch, 0, 0.0
        self.losses, self.newest, self.sent = {}, {}, {}

    def add(self, r: dict[str, Any]) -> None:
        """Take one stored record into the figures kept."""
        step, stage, replica = int(r["step"]), int(r["stage"]), int(r.get("replica", 0))
        sent = int(r.get("bytes", 0))
        if "loss" in r:
            self.losses[step] = (
                float(r["loss"]),
                float(r.get("at", 0.0)),
                float(r.get("step_seconds", 0.0)),
            )
        if step >= self.newest.get((stage, replica), (-1, 0))[0]:
            self.newest[(stage, replica)] = (step, sent)
        if replica == 0 and r.get("epoch") == self.epoch:
            by_step = self.sent.setdefault(stage, {})
            by_step[step] = sent
            if len(by_step) > 2 * SENT_STEPS:
                for old in sorted(by_step)[:-SENT_STEPS]:
                    del by_step[old]


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
                held.reset(job.epoch)
            held.next_step = max(held.next_step, from_step)
            rows = await self.manager.metrics(job.job_id, held.next_step)
            for r in rows:
                held.add(r)
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
