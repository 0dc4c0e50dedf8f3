"""The worker registry: who has joined, what they can do, whether they are alive.

Each worker's record keeps the SHA-256 of its current credential (`credential_hash`, set
by `coordinator.roles` at every registration), never the credential itself, so a restarted
coordinator still knows who its workers are.

Heart-beats only touch memory (a heartbeat is answered without any store write, so
hundreds of workers beating every second stay cheap); membership changes - a worker
joins, is lost, leaves, is assigned to a job - are written to the store by the caller.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from coordinator.planning.plan import WorkerSlot
from coordinator.states import WORKER_ALIVE, StageState, WorkerStatus

if TYPE_CHECKING:
    from coordinator.capacity import Capacity
    from coordinator.exclusions import Exclusions


@dataclass
class WorkerState:
    """One worker as the coordinator sees it."""

    worker_id: str
    name: str
    address: str
    gflops: float = 0.0
    memory_bytes: int = 0
    device: str = "cpu"
    threads: int = 0
    registered_at: float = field(default_factory=time.time)
    state: WorkerStatus = WorkerStatus.IDLE
    job_id: str = ""
    epoch: int = 0
    leaving: bool = False
    # SHA-256 (hex) of the credential of its latest registration ("": none issued yet).
    credential_hash: str = ""
    # What the worker last said it was doing, and when (monotonic clock; memory only):
    # job id, epoch, step and its stage's state (the string as it came, see StageState).
    last_seen: float = field(default_factory=time.monotonic)
    reported: tuple[str, int, int, str] = ("", 0, 0, StageState.IDLE.value)

    @property
    def alive(self) -> bool:
        return self.state in WORKER_ALIVE

    def to_record(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "name": self.name,
            "address": self.address,
            "gflops": self.gflops,
            "memory_bytes": self.memory_bytes,
            "device": self.device,
            "threads": self.threads,
            "registered_at": self.registered_at,
            "state": self.state.value,
            "job_id": self.job_id,
            "epoch": self.epoch,
            "leaving": self.leaving,
            "credential_hash": self.credential_hash,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> WorkerState:
        return cls(
            worker_id=r["worker_id"],
            name=r["name"],
            address=r["address"],
            gflops=float(r.get("gflops", 0.0)),
            memory_bytes=int(r.get("memory_bytes", 0)),
            device=r.get("device", "cpu"),
            threads=int(r.get("threads", 0)),
            registered_at=float(r.get("registered_at", 0.0)),
            state=WorkerStatus.parse(r.get("state", WorkerStatus.IDLE.value)),
            job_id=r.get("job_id", ""),
            epoch=int(r.get("epoch", 0)),
            leaving=bool(r.get("leaving", False)),
            credential_hash=str(r.get("credential_hash", "")),
        )


# After a coordinator takes over, how long a worker it knew may stay silent before it is
# declared lost (at least: never less than the usual timeout).
TAKEOVER_GRACE_S = 10.0


class Registry:
    """All workers, by id."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.workers: dict[str, WorkerState] = {}
        # Told the seconds since a worker's previous heart-beat at each one (the metrics').
        self.on_heartbeat_gap: Callable[[float], None] | None = None
        # Workers left out of planning (backed off or quarantined); None: nobody is.
        self.exclusions: Exclusions | None = None
        # The speeds the planner believes (measured, or claims bounded); None: the claims.
        self.capacity: Capacity | None = None
        # Whether an address is one the coordinator relays (`coordinator.relay`).
        self.relayed: Callable[[str], bool] = _not_relayed

    def load(self, records: list[dict[str, Any]]) -> None:
        """Take over the workers a previous coordinator knew; each gets a grace period to
        heart-beat before it is declared lost: the usual timeout, and at least
        TAKEOVER_GRACE_S (a worker finds a restarted coordinator only on its next retry,
        and one declared lost by mistake would cost its job a re-plan)."""
        now = time.monotonic() + max(0.0, TAKEOVER_GRACE_S - self.timeout_s)
        for r in records:
            w = WorkerState.from_record(r)
            w.last_seen = now
            self.workers[w.worker_id] = w

    def register(
        self,
        *,
        name: str,
        address: str,
        gflops: float,
        memory_bytes: int,
        device: str,
        threads: int,
        worker_id: str = "",
    ) -> WorkerState:
        """A worker joins, or (with its id) comes back after a coordinator restart."""
        w = self.workers.get(worker_id) if worker_id else None
        if w is None:
            w = WorkerState(worker_id=uuid.uuid4().hex[:12], name=name, address=address)
            self.workers[w.worker_id] = w
        w.name, w.address = name, address
        w.gflops, w.memory_bytes, w.device, w.threads = gflops, memory_bytes, device, threads
        if not w.alive:
            w.state, w.job_id, w.epoch = WorkerStatus.IDLE, "", 0
        w.leaving = False
        w.last_seen = time.monotonic()
        return w

    def get(self, worker_id: str) -> WorkerState | None:
        return self.workers.get(worker_id)

    def at_address(self, address: str) -> WorkerState | None:
        """The worker at `address`: a live one if any, else the latest to register there."""
        found = [w for w in self.workers.values() if w.address == address]
        found.sort(key=lambda w: (w.alive, w.registered_at))
        return found[-1] if found else None

    def heartbeat(self, worker_id: str, reported: tuple[str, int, int, str]) -> WorkerState | None:
        w = self.workers.get(worker_id)
        if w is None or not w.alive:
            return None
        now = time.monotonic()
        if self.on_heartbeat_gap is not None and now >= w.last_seen:  # not in a take-over's grace
            self.on_heartbeat_gap(now - w.last_seen)
        w.last_seen = now
        w.reported = reported
        return w

    def expire(self) -> list[WorkerState]:
        """Declare lost every live worker silent for longer than the timeout."""
        now = time.monotonic()
        lost = []
        for w in self.workers.values():
            if w.alive and now - w.last_seen > self.timeout_s:
                w.state = WorkerStatus.LEFT if w.leaving else WorkerStatus.LOST
                lost.append(w)
        return lost

    def free(self, *, unreached: bool = False) -> list[WorkerSlot]:
        """Live, idle workers that are not leaving nor excluded, in registration order; only
        those the coordinator has reached at their address (`coordinator.capacity`) unless
        `unreached` (the link survey, which reaches them)."""
        idle = [w for w in self.workers.values() if w.state == WorkerStatus.IDLE and not w.leaving]
        if self.capacity is not None and not unreached:
            reach = self.capacity
            idle = [w for w in idle if reach.reachable(w.worker_id, w.address)]
        if self.exclusions is not None:
            out = self.exclusions
            idle = [
                w
                for w in idle
                if not out.excluded(w.worker_id) and not out.excluded_address(w.address)
            ]
        idle.sort(key=lambda w: (w.registered_at, w.worker_id))
        return [
            WorkerSlot(w.worker_id, w.name, w.address, self.planning_gflops(w), w.memory_bytes)
            for w in idle
        ]

    def planning_gflops(self, w: WorkerState) -> float:
        """The speed the planner counts on for `w`: measured, or its claim bounded."""
        return w.gflops if self.capacity is None else self.capacity.believed(w.worker_id, w.gflops)

    def assign(self, worker_ids: tuple[str, ...], job_id: str, epoch: int) -> None:
        for wid in worker_ids:
            w = self.workers[wid]
            w.state, w.job_id, w.epoch = WorkerStatus.BUSY, job_id, epoch

    def release(self, worker_ids: tuple[str, ...], job_id: str) -> list[WorkerState]:
        """Free the workers still holding `job_id`; returns the ones changed."""
        changed = []
        for wid in worker_ids:
            w = self.workers.get(wid)
            if w is not None and w.job_id == job_id:
                w.job_id, w.epoch = "", 0
                if w.state == WorkerStatus.BUSY:
                    w.state = WorkerStatus.LEFT if w.leaving else WorkerStatus.IDLE
                changed.append(w)
        return changed


def _not_relayed(address: str) -> bool:
    return False
