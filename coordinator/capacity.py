"""What a worker can compute, as the planner believes it: bounded claims, measured speeds.

A worker registers with the speed and memory it says it has (`worker.resources` measures
them on the worker's side, but a volunteer can send anything). The coordinator refuses
claims no machine has (`check_claim`) and plans with a figure it believes
(`Capacity.believed`):

- a worker that ran a stage is measured from its first steps' profile (the FLOPs of its
  stage over the seconds they took: its achieved rate), put in matmul terms by the
  efficiency the profiled workers typically reach (the median of achieved over claimed,
  so one liar cannot move it), and never above its claim;
- a worker not measured yet gets its claim bounded by what measured workers typically
  reach (the median of their figures), or by `UNMEASURED_GFLOPS` when none is measured:
  a claim alone never wins placement.

A claim far above the measurement (`DOUBT_FACTOR`) is an event. The achieved rates are
stored, so a restarted coordinator believes what its predecessor measured.

A worker's address is a claim too: with the link survey on, the planner uses a worker only
once a call of the coordinator's was answered at that address (`reachable`), so workers
registered at addresses where nothing listens never get a stage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import statistics

from coordinator.events import CLUSTER, EventKind, EventLog
from coordinator.store import StateStore, StoreError

log = logging.getLogger("archipelago.coordinator")

# Claims no single worker can make: a PFLOP/s is twice what today's largest accelerator
# reaches on the float32 (TF32) matmul a worker measures itself with; 64 TiB is more
# memory than any one machine holds; threads beyond 4096 are no CPU's.
MAX_CLAIMED_GFLOPS = 1e6
MAX_CLAIMED_MEMORY_BYTES = 1 << 46
MAX_CLAIMED_THREADS = 4096
# The speed every worker is planned with before any worker was measured (its claim if
# lower): all are alike until the first steps tell them apart.
UNMEASURED_GFLOPS = 10.0
# A claim this many times its measurement is reported as doubted.
DOUBT_FACTOR = 4.0
STORE_KEY = "measured-capacity"


def check_claim(gflops: float, memory_bytes: int, threads: int) -> None:
    """Refuse a registration's claimed resources that no worker can have (ValueError,
    naming the figure and the bound)."""
    if not (isinstance(gflops, int | float) and math.isfinite(gflops) and gflops >= 0):
        raise ValueError(f"claimed speed {gflops!r} GFLOP/s is not a finite number >= 0")
    if gflops > MAX_CLAIMED_GFLOPS:
        raise ValueError(
            f"claimed speed {gflops:.3g} GFLOP/s is above the {MAX_CLAIMED_GFLOPS:.0e} "
            "GFLOP/s any one worker can reach"
        )
    if not 0 <= memory_bytes <= MAX_CLAIMED_MEMORY_BYTES:
        raise ValueError(
            f"claimed memory {memory_bytes} bytes is above the {MAX_CLAIMED_MEMORY_BYTES >> 40} "
            "TiB any one worker can have"
        )
    if not 0 <= threads <= MAX_CLAIMED_THREADS:
        raise ValueError(f"claimed {threads} threads; at most {MAX_CLAIMED_THREADS} are accepted")


class Capacity:
    """The workers' measured speeds, and the figure the planner believes for each."""

    def __init__(self, store: StateStore, events: EventLog | None = None) -> None:
        self.store = store
        self.events = events
        # Achieved FLOP/s on a stage's real operators, and the claim (GFLOP/s) it was
        # measured against, by worker id.
        self._achieved: dict[str, tuple[float, float]] = {}
        self._doubted: set[str] = set()
        self._efficiency = 1.0
        self._typical_gflops: float | None = None
        # Doubted claims whose events are not recorded yet, and whether a measurement
        # changed since the last store write.
        self._pending: list[tuple[str, str, float, float]] = []
        self._dirty = False
        # Where the coordinator last reached each worker (memory only: a coordinator that
        # takes over reaches them again). Checked only when something reaches them: the
        # link survey (`coordinator.link_survey`) sets `require_reached`.
        self._reached: dict[str, str] = {}
        self.require_reached = False

    async def load(self) -> None:
        """Take back the measurements a previous coordinator stored."""
        try:
            blob = await asyncio.to_thread(self.store.get_blob, STORE_KEY)
            if blob is None:
                return
            records = json.loads(blob)
            achieved = {
                str(wid): (float(r["achieved_flops"]), float(r["claimed_gflops"]))
                for wid, r in records.items()
            }
        except (StoreError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("stored capacity measurements unreadable (%s); measuring again", e)
            return
        self._achieved = {w: (a, c) for w, (a, c) in achieved.items() if math.isfinite(a) and a > 0}
        self._refresh()

    def _refresh(self) -> None:
        """Recompute the typical efficiency and speed after the measurements changed."""
        ratios = [a / (c * 1e9) for a, c in self._achieved.values() if c > 0]
        self._efficiency = statistics.median(ratios) if ratios else 1.0
        figures = [self.measured(w) for w in self._achieved]
        known = [f for f in figures if f is not None]
        self._typical_gflops = statistics.median(known) if known else None

    def measured(self, worker_id: str) -> float | None:
        """The worker's measured speed in matmul GFLOP/s (never above its claim then), or
        None if it was never measured."""
        got = self._achieved.get(worker_id)
        if got is None:
            return None
        achieved, claimed = got
        figure = achieved / 1e9 / self._efficiency
        return min(figure, claimed) if claimed > 0 else figure

    def believed(self, worker_id: str, claimed: float) -> float:
        """The speed the planner counts on for a worker claiming `claimed` GFLOP/s."""
        figure = self.measured(worker_id)
        if figure is not None:
            return figure
        bound = UNMEASURED_GFLOPS if self._typical_gflops is None else self._typical_gflops
        return min(claimed, bound) if claimed > 0 else 0.0

    def note(self, worker_id: str, name: str, claimed: float, achieved: float) -> None:
        """A stage's profile measured the worker at `achieved` FLOP/s on real operators
        (kept in memory at once; `flush` stores it and says whether the claim was far off)."""
        if not (math.isfinite(achieved) and achieved > 0):
            return
        self._achieved[worker_id] = (achieved, claimed)
        self._refresh()
        self._dirty = True
        raw = achieved / 1e9 / self._efficiency
        if claimed > DOUBT_FACTOR * raw and worker_id not in self._doubted:
            self._doubted.add(worker_id)
            self._pending.append((worker_id, name, claimed, raw))

    async def flush(self) -> None:
        """Store the measurements and record an event for each claim found far off."""
        pending, self._pending = self._pending, []
        for worker_id, name, claimed, raw in pending:
            text = (
                f"worker {name} claimed {claimed:.3g} GFLOP/s; measured {raw:.3g} GFLOP/s: "
                "planned with the measurement"
            )
            log.warning("%s", text)
            if self.events is not None:
                await self.events.record(
                    CLUSTER,
                    EventKind.CAPACITY_DOUBTED,
                    text,
                    worker_id=worker_id,
                    claimed_gflops=claimed,
                    measured_gflops=raw,
                )
        if not self._dirty:
            return
        self._dirty = False
        records = {
            w: {"achieved_flops": a, "claimed_gflops": c} for w, (a, c) in self._achieved.items()
        }
        try:
            await asyncio.to_thread(self.store.put_blob, STORE_KEY, json.dumps(records).encode())
        except (StoreError, ValueError) as e:
            log.warning("capacity measurements not stored: %s", e)

    # -- reachability: a worker's address is believed once the coordinator reached it ----

    def reachable(self, worker_id: str, address: str) -> bool:
        """Whether the planner may use the worker at `address`: the coordinator's own call
        reached it there (always, when nothing checks: `require_reached` off)."""
        return not self.require_reached or self._reached.get(worker_id) == address

    def mark_reached(self, worker_id: str, address: str) -> None:
        """A call of the coordinator's was answered by the worker at `address`."""
        self._reached[worker_id] = address

    def rows(self) -> dict[str, float]:
        """Every measured worker's figure (matmul GFLOP/s), for status and the dashboard."""
        return {w: f for w in self._achieved if (f := self.measured(w)) is not None}
