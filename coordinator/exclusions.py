"""Workers left out of planning: for a back-off time, or for good (quarantine).

A worker that cannot be reached, makes no progress, or claims a capacity its measurement
belies is excluded for a back-off time that doubles with each repeat offence; one whose
values were refused (non-finite, out of bounds) is quarantined for good. Either way the
planner stops handing it stages (`Registry.free` asks `excluded`), so one bad worker can
never stall a job. Exclusions are stored, so a restarted coordinator keeps them, and each
one is an event in the cluster's log. Times are wall-clock seconds (`time.time()`): they
must mean the same thing to the coordinator that takes over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from coordinator.events import CLUSTER, EventKind, EventLog
from coordinator.store import StateStore, StoreError

log = logging.getLogger("archipelago.coordinator")

# A first offence keeps a worker out this long; each repeat doubles it, up to the cap.
DEFAULT_BACKOFF_S = 30.0
DEFAULT_MAX_BACKOFF_S = 3600.0
# How an exclusion for an address that answered no call starts (`coordinator.link_survey`).
UNREACHABLE_REASON = "unreachable at "


@dataclass(frozen=True)
class Exclusion:
    """Why and until when one worker is left out of planning."""

    worker_id: str
    name: str
    reason: str
    since: float  # wall clock
    until: float | None  # wall clock; None: for good (quarantine)
    offences: int = 1  # how many times it was excluded: the next back-off doubles with it
    # Where it was (HOST:PORT; "" if not said): a worker that joins anew under another id
    # at the same address is the same bad address, and is left out too.
    address: str = ""

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until

    def to_record(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "name": self.name,
            "reason": self.reason,
            "since": self.since,
            "until": self.until,
            "offences": self.offences,
            "address": self.address,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Exclusion:
        until = r.get("until")
        return cls(
            worker_id=str(r["worker_id"]),
            name=str(r.get("name", "")),
            reason=str(r.get("reason", "")),
            since=float(r.get("since", 0.0)),
            until=None if until is None else float(until),
            offences=max(1, int(r.get("offences", 1))),
            address=str(r.get("address", "")),
        )


class Exclusions:
    """Every worker's exclusion, in memory for the planner and stored for a successor.

    Expired records are kept (they are not `excluded`): a worker that offends again after
    its back-off is kept out twice as long.
    """

    def __init__(
        self,
        store: StateStore,
        events: EventLog | None = None,
        *,
        backoff_s: float = DEFAULT_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    ) -> None:
        if not (backoff_s > 0 and max_backoff_s >= backoff_s):
            raise ValueError(
                f"back-off must be > 0 and its cap at least as long, got {backoff_s} and "
                f"{max_backoff_s}"
            )
        self.store = store
        self.events = events
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._by_worker: dict[str, Exclusion] = {}
        self._by_address: dict[str, Exclusion] = {}

    async def load(self) -> None:
        """Take over the exclusions a previous coordinator stored (at coordinator start)."""
        records = await asyncio.to_thread(self.store.list_exclusions)
        for r in records:
            try:
                e = Exclusion.from_record(r)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("exclusion record %r skipped: %s", r, exc)
                continue
            self._remember(e)

    def _remember(self, e: Exclusion) -> None:
        self._by_worker[e.worker_id] = e
        if e.address:
            # The address keeps the exclusion in force the longest (a quarantine wins).
            now = time.time()
            old = self._by_address.get(e.address)
            longer = e.until is None or (
                old is not None and old.until is not None and e.until > old.until
            )
            if old is None or not old.active(now) or longer:
                self._by_address[e.address] = e

    async def exclude(
        self, worker_id: str, name: str, *, reason: str, until: float | None, address: str = ""
    ) -> None:
        """Leave the worker out of planning until `until` (wall clock), or for good if None.

        An exclusion never shortens one in force: a quarantined worker stays quarantined,
        and a later `until` wins over an earlier one."""
        now = time.time()
        old = self._by_worker.get(worker_id)
        if until is not None and not math.isfinite(until):
            until = None
        if (
            old is not None
            and old.active(now)
            and (old.until is None or (until is not None and until <= old.until))
        ):
            return  # already kept out at least that long: nothing new to say
        offences = 1 if old is None else old.offences + 1
        e = Exclusion(worker_id, name, reason, now, until, offences, address)
        self._remember(e)
        try:
            await asyncio.to_thread(self.store.put_exclusion, e.to_record())
        except (StoreError, ValueError) as exc:
            # Kept in memory regardless: planning must leave the worker out now.
            log.warning("exclusion of worker %s not stored: %s", worker_id, exc)
        if until is None:
            log.warning("worker %s (%s) quarantined: %s", name, worker_id, reason)
        else:
            log.warning(
                "worker %s (%s) excluded for %.0f s: %s", name, worker_id, until - now, reason
            )
        if self.events is not None:
            kind = EventKind.QUARANTINED if until is None else EventKind.EXCLUDED
            text = (
                f"worker {name} quarantined: {reason}"
                if until is None
                else f"worker {name} excluded for {until - now:.0f} s: {reason}"
            )
            await self.events.record(
                CLUSTER,
                kind,
                text,
                worker_id=worker_id,
                worker_name=name,
                reason=reason,
                until=0.0 if until is None else until,
                offences=offences,
            )

    def next_backoff_s(self, worker_id: str) -> float:
        """How long the worker's next back-off lasts: the base, doubled per earlier offence."""
        old = self._by_worker.get(worker_id)
        doublings = 0 if old is None else old.offences
        # min() before the power would overflow: 2**doublings grows without bound.
        return min(self.max_backoff_s, self.backoff_s * 2.0 ** min(doublings, 64))

    async def back_off(self, worker_id: str, name: str, *, reason: str, address: str = "") -> float:
        """Exclude the worker (and its address, if given) for its next back-off time;
        returns that time in seconds. A worker already kept out is not charged again: the
        failures of calls made before its exclusion are one offence, not several."""
        now = time.time()
        current = self._by_worker.get(worker_id)
        if current is not None and current.active(now):
            return math.inf if current.until is None else current.until - now
        seconds = self.next_backoff_s(worker_id)
        await self.exclude(worker_id, name, reason=reason, until=now + seconds, address=address)
        return seconds

    async def moved(self, worker_id: str, address: str) -> bool:
        """The worker registered again, with its credential, at another `address`: a
        back-off for being unreachable at its old one ends now. Its offences stay counted
        (a next back-off still doubles, also for a coordinator that takes over) and its old
        address stays excluded until the back-off's end (in this process: the store keeps
        one record per worker). A worker behind
        NAT gets a new address whenever its relay stream comes back (a restarted
        coordinator first finds its old relay port closed). True if a back-off ended."""
        now = time.time()
        e = self._by_worker.get(worker_id)
        if (
            e is None
            or e.until is None  # a quarantine holds wherever the worker goes
            or not e.active(now)
            or not e.address
            or e.address == address
            or not e.reason.startswith(UNREACHABLE_REASON)
        ):
            return False
        ended = dataclasses.replace(e, until=now)
        self._by_worker[worker_id] = ended
        try:
            await asyncio.to_thread(self.store.put_exclusion, ended.to_record())
        except (StoreError, ValueError) as exc:
            log.warning("exclusion of worker %s not updated in the store: %s", worker_id, exc)
        log.info(
            "worker %s (%s) is at %s now: its back-off for %s ended",
            e.name,
            worker_id,
            address,
            e.address,
        )
        return True

    async def lift(self, worker_id: str) -> None:
        """Forget the worker's exclusion and its offences (an operator's pardon)."""
        gone = self._by_worker.pop(worker_id, None)
        if gone is not None and self._by_address.get(gone.address) is gone:
            del self._by_address[gone.address]
        try:
            await asyncio.to_thread(self.store.delete_exclusion, worker_id)
        except StoreError as exc:
            log.warning("exclusion of worker %s not deleted from the store: %s", worker_id, exc)

    def excluded(self, worker_id: str, now: float | None = None) -> bool:
        """Whether the planner must leave the worker out at `now` (default: this instant)."""
        e = self._by_worker.get(worker_id)
        return e is not None and e.active(time.time() if now is None else now)

    def excluded_address(self, address: str, now: float | None = None) -> bool:
        """Whether an exclusion in force names this HOST:PORT."""
        e = self._by_address.get(address) if address else None
        return e is not None and e.active(time.time() if now is None else now)

    def reason(self, worker_id: str) -> str | None:
        """Why the worker is excluded now, or None if it is not."""
        e = self._by_worker.get(worker_id)
        return e.reason if e is not None and e.active(time.time()) else None

    def get(self, worker_id: str) -> Exclusion | None:
        """The worker's exclusion in force now, or None."""
        e = self._by_worker.get(worker_id)
        return e if e is not None and e.active(time.time()) else None

    def rows(self) -> list[dict[str, Any]]:
        """The exclusions in force, for status and the dashboard: the stored record plus
        "for_good" and "remaining_s" (0 for a quarantine)."""
        now = time.time()
        out = []
        for e in sorted(self._by_worker.values(), key=lambda e: e.worker_id):
            if e.active(now):
                out.append(
                    {
                        **e.to_record(),
                        "for_good": e.until is None,
                        "remaining_s": 0.0 if e.until is None else max(0.0, e.until - now),
                    }
                )
        return out
