"""The states a job, a worker and a worker's stage can be in, as the coordinator names them.

Each is a `StrEnum`: a member is the very string the store's records, the API's messages
and the command line show, so nothing outside the coordinator sees a change. A state read
back from a stored record goes through `parse`, which refuses a string it does not know.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self


class UnknownState(ValueError):
    """A stored record names a state this coordinator does not know."""


class RecordedState(StrEnum):
    """A state that is written to the store and read back from it."""

    @classmethod
    def parse(cls, value: object) -> Self:
        """The member named by `value` (as a stored record holds it)."""
        for member in cls:
            if member.value == value:
                return member
        known = ", ".join(m.value for m in cls)
        raise UnknownState(f"{cls.__name__} {value!r} in a stored record is not one of: {known}")


class JobState(RecordedState):
    """Where a job is in its life (see `coordinator.job_lifecycle`)."""

    QUEUED = "queued"  # waiting for its first plan
    STARTING = "starting"  # planned; its stages are being handed to the workers
    RUNNING = "running"
    RECOVERING = "recovering"  # its plan broke; waiting to be planned again
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these states is over: nothing moves it again.
JOB_ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})
# A job in one of these has a plan out with workers (reports of its epoch are current).
JOB_PLAN_OUT = frozenset({JobState.STARTING, JobState.RUNNING})
# A job in one of these waits for the scheduler to plan it.
JOB_WAITING = frozenset({JobState.QUEUED, JobState.RECOVERING})


class WorkerStatus(RecordedState):
    """Whether a worker is there, and whether it holds a job."""

    IDLE = "idle"
    BUSY = "busy"  # assigned to a job's plan
    LOST = "lost"  # stopped heart-beating, or could not be reached
    LEFT = "left"  # asked to leave, and went


# A worker in one of these heart-beats and may be given work.
WORKER_ALIVE = frozenset({WorkerStatus.IDLE, WorkerStatus.BUSY})


class StageState(StrEnum):
    """What a worker says its stage is doing, in its heart-beats.

    A heart-beat's state stays the string that came over the wire (a worker of another
    version may send one not listed here); it is compared with these members.
    """

    IDLE = "idle"  # no stage
    LEAVING = "leaving"  # no stage, and the worker is on its way out
    LOADED = "loaded"
    RUNNING = "running"
    DRAINED = "drained"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"


# A stage in one of these holds the worker for its job.
STAGE_ACTIVE = frozenset({StageState.LOADED, StageState.RUNNING})
# A stage in one of these has stopped without finishing.
STAGE_BROKEN = frozenset({StageState.FAILED, StageState.ABORTED})
