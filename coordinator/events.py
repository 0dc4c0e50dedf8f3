"""The timelines of the jobs and of the cluster: what happened, when, and why.

Each job has its own event log (planned, re-planned and why, a worker lost, a checkpoint,
resumed, a validation loss, ended), and the cluster has one of workers joining, leaving and
being lost. Events are stored (`StateStore.put_event`), so a coordinator that takes over
keeps the timeline, and numbered per log, so a reader (the dashboard) asks only for what
came after the last one it saw. An event is plain data: "seq", "at" (wall clock), "kind",
"text" (one line a person reads) and the figures it is about.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from typing import Any

from coordinator.store import StateStore, StoreError
from coordinator.store.interface import EVENTS_KEPT

log = logging.getLogger("archipelago.coordinator")

# The scope of the cluster's own log (jobs' logs are scoped by their job id).
CLUSTER = "cluster"


class EventKind(StrEnum):
    """What an event records; the string is what the store and the dashboard hold."""

    SUBMITTED = "submitted"
    PLANNED = "planned"  # a plan was made and handed out (epoch 1, or again after a re-plan)
    RESUMED = "resumed"  # a new plan starts from a checkpoint
    REPLANNING = "replanning"  # the plan broke; the reason says why
    WORKER_LOST = "worker_lost"  # a worker of the job's plan stopped heart-beating
    SHRUNK = "shrunk"  # a replica was let go and the job went on with the others
    GROWN = "grown"  # the job drains to take more replicas
    DRAINED = "drained"  # every stage stopped at a step boundary; it is planned again
    CHECKPOINT = "checkpoint"
    VALIDATION = "validation"  # the held-out loss of a checkpoint
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # A job's: a worker named by a stage that refused its values, excluded for a back-off
    # time (short of a quarantine, `coordinator.quarantine`); the evidence is in the event.
    SUSPECTED = "suspected"
    # A job's: a stage reported a loss that is not finite or not plausible.
    BAD_LOSS = "bad_loss"
    # A job's: the coordinator recomputed a stage's micro-batch (`coordinator.spot_checks`):
    # passed, mismatch (the sender is accused: a `suspected` or `quarantined` event
    # follows) or skipped, with the figures.
    SPOT_CHECK = "spot_check"
    # The cluster's log.
    JOINED = "joined"
    LEAVING = "leaving"
    LEFT = "left"
    LOST = "lost"
    EXCLUDED = "excluded"  # left out of planning for a back-off time; the reason says why
    QUARANTINED = "quarantined"  # left out of planning for good
    CAPACITY_DOUBTED = "capacity_doubted"  # a claimed speed far above the measured one


Field = str | int | float | bool


class EventLog:
    """Writes and reads the stored event logs."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def record(self, scope: str, kind: EventKind, text: str, **fields: Field) -> None:
        """Append an event to `scope`'s log. A store that refuses it costs the event, never
        the caller: the timeline is for reading, the job goes on without it."""
        event: dict[str, Any] = {"at": time.time(), "kind": kind.value, "text": text, **fields}
        try:
            await asyncio.to_thread(self.store.put_event, scope, event)
        except (StoreError, ValueError) as e:
            log.warning("event %s of %s not stored: %s", kind.value, scope, e)

    async def since(self, scope: str, after_seq: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """The events of `scope` after `after_seq`, oldest first (at most `limit`)."""
        return await asyncio.to_thread(self.store.events, scope, after_seq, limit)

    async def latest(self, scope: str, limit: int = 200) -> list[dict[str, Any]]:
        """The newest `limit` events of `scope`, oldest first."""
        every = await asyncio.to_thread(self.store.events, scope, 0, EVENTS_KEPT)
        return every[-limit:]
