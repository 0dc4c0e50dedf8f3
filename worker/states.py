"""The states a worker and the stage job it holds can be in, as the worker reports them.

Each is a `StrEnum`: a member is the very string the heartbeat and the status reply carry
(the coordinator compares them with its own `StageState`), so the wire is unchanged.
"""

from __future__ import annotations

from enum import StrEnum


class StageState(StrEnum):
    """Where a loaded stage job is."""

    LOADED = "loaded"  # built, waiting for the coordinator's start
    RUNNING = "running"
    DRAINED = "drained"  # stopped at a step boundary on request, checkpoint uploaded
    FINISHED = "finished"
    ABORTED = "aborted"  # dropped by the worker (a new plan, a stop, shutdown)
    FAILED = "failed"

    @property
    def live(self) -> bool:
        """Whether the job still takes transfers and holds the worker."""
        return self in (StageState.LOADED, StageState.RUNNING)


class NodeState(StrEnum):
    """What a worker holding no stage job is doing (otherwise it reports the job's state)."""

    IDLE = "idle"
    LEAVING = "leaving"
