"""Keeping the measured bandwidth between workers up to date.

The OP-Fence planner needs every directed link between the workers it may use. The prober
asks one worker at a time to measure its link to one other (`MeasureLinks`), at most
`concurrency` pairs at once and never two sharing a worker, so probes do not disturb each
other; it probes idle workers, so a running job is not disturbed either, with one
exception: a worker that joins while others train is measured once against each of them
(a short probe beside the job's traffic), so the planner can price taking it into their
job (`coordinator.elastic`). A link is measured when a worker joins (or comes back at a
new address) and again, between idle workers, once it is older than `refresh_s`. Figures
are kept in the store, so a restarted coordinator plans with them at once.

Each figure is one end's word: the planner is given a pair's figure only once both ends
measured it, at the slower of the two (`coordinator.planning.links.cross_checked`), and a
figure no link can reach is refused. Among hundreds of idle workers a scan looks at two
blocks of them at a time, in turn, so every pair is measured in the end.

A worker's address is only its word too: each new one is first asked to measure its link
to itself (the cheapest call there is), and until some call of the coordinator's is
answered there the planner leaves it out (`coordinator.capacity`); one that answers none
of REACH_FAILURES tries is backed off (`coordinator.exclusions`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.exclusions import UNREACHABLE_REASON
from coordinator.planning.links import MAX_BELIEVED_BANDWIDTH_BPS, cross_checked
from coordinator.registry import Registry
from coordinator.store import StateStore
from coordinator.worker_client import WorkerCallError, WorkerClient

log = logging.getLogger("archipelago.coordinator")

STORE_KEY = "links"
# The smallest measurement a worker accepts: what reaching a new worker costs it. A worker
# that does not answer REACH_FAILURES calls in a row, REACH_RETRY_S apart, is backed off.
FIRST_REACH_BYTES = 64 << 10
REACH_FAILURES = 2
REACH_RETRY_S = 2.0
# A failed measurement is tried again after this long, not at every scheduler pass.
RETRY_FAILED_S = 30.0
# What is due is worked out again at most this often (it is quadratic in the workers).
RESCAN_S = 2.0
# One scan looks for pairs to measure among at most this many idle workers: two blocks
# of half as many, a different pair of blocks each scan, so that in a swarm of hundreds
# every pair comes round in turn while a scan stays cheap (it is quadratic).
MAX_PROBED_WORKERS = 64


@dataclass(frozen=True)
class LinkRecord:
    """One measured directed link, between the addresses the two workers had then."""

    src: str
    dst: str
    src_address: str
    dst_address: str
    bandwidth: float  # bytes per second; 0 when the measurement failed
    rtt_s: float
    measured_at: float  # wall clock
    error: str = ""


@dataclass(frozen=True)
class ProbeConfig:
    """How links are measured (built from the coordinator's command line)."""

    refresh_s: float = 600.0
    concurrency: int = 2
    max_bytes: int = 8 << 20
    target_seconds: float = 0.4


class LinkProber:
    """The link figures, and the measurements that keep them current."""

    def __init__(
        self,
        registry: Registry,
        workers: WorkerClient,
        store: StateStore,
        config: ProbeConfig | None = None,
    ) -> None:
        self.registry = registry
        self.workers = workers
        self.store = store
        self.config = config or ProbeConfig()
        self.links: dict[tuple[str, str], LinkRecord] = {}
        self._busy: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._due: list[tuple[str, str]] = []
        self._next_scan = 0.0
        self._scans = 0  # which pair of blocks of idle workers the next scan considers
        # Reaching new workers: failed calls in a row, when to try again (monotonic), and
        # each worker's last call error.
        self._reach_failures: dict[str, int] = {}
        self._reach_after: dict[str, float] = {}
        self._last_error: dict[str, str] = {}

    async def load(self) -> None:
        blob = await asyncio.to_thread(self.store.get_blob, STORE_KEY)
        if blob is None:
            return
        try:
            records = [LinkRecord(**r) for r in json.loads(blob)]
        except (ValueError, TypeError) as e:
            log.warning("stored link figures unreadable (%s); measuring again", e)
            return
        self.links = {(r.src, r.dst): r for r in records}

    async def _save(self) -> None:
        data = json.dumps([asdict(r) for r in self.links.values()]).encode()
        await asyncio.to_thread(self.store.put_blob, STORE_KEY, data)

    # -- what is known ----------------------------------------------------------------------

    def current(self, src: str, dst: str) -> LinkRecord | None:
        """The figure for src -> dst if it was measured at the workers' present addresses."""
        rec = self.links.get((src, dst))
        a, b = self.registry.get(src), self.registry.get(dst)
        if rec is None or a is None or b is None:
            return None
        if (rec.src_address, rec.dst_address) != (a.address, b.address):
            return None
        return rec

    def unmeasured(self, worker_ids: Iterable[str]) -> list[tuple[str, str]]:
        """Directed pairs among `worker_ids` with no current, successful measurement."""
        ids = list(worker_ids)
        out = []
        for a in ids:
            for b in ids:
                rec = self.current(a, b) if a != b else None
                if a != b and (rec is None or rec.error):
                    out.append((a, b))
        return out

    def figures(self, worker_ids: Iterable[str]) -> dict[tuple[str, str], tuple[float, float]]:
        """(bandwidth bytes/s, rtt s) of every directed pair among `worker_ids` that both
        ends measured, as the planner may believe it (`cross_checked`)."""
        ids = list(worker_ids)
        out = {}
        for a in ids:
            for b in ids:
                rec = self.current(a, b) if a != b else None
                if rec is not None and not rec.error:
                    out[(a, b)] = (rec.bandwidth, rec.rtt_s)
        return cross_checked(out)

    # -- measuring ---------------------------------------------------------------------------

    def _window(self, idle: list[str]) -> list[str]:
        """The idle workers this scan considers: all of them when they are few, else the
        next pair of blocks in turn (every pair of workers shares some pair of blocks)."""
        if len(idle) <= MAX_PROBED_WORKERS:
            return idle
        half = MAX_PROBED_WORKERS // 2
        blocks = [idle[i : i + half] for i in range(0, len(idle), half)]
        combos = [(p, q) for p in range(len(blocks)) for q in range(p + 1, len(blocks))]
        p, q = combos[self._scans % len(combos)]
        self._scans += 1
        return blocks[p] + blocks[q]

    def _wanted(self) -> list[tuple[str, str]]:
        """Pairs of idle workers to measure, most useful first: the way back of a link
        measured one way only (its figure is believed once both ends agree), then the
        never-measured, then the oldest."""
        idle = self._window([w.worker_id for w in self.registry.free(unreached=True)])
        now = time.time()
        wanted: list[tuple[int, float, str, str]] = []
        for a in idle:
            for b in idle:
                if a == b:
                    continue
                rec = self.current(a, b)
                if rec is None:
                    back = self.current(b, a)
                    wanted.append((0 if back is not None and not back.error else 1, 0.0, a, b))
                    continue
                age = now - rec.measured_at
                if age > (RETRY_FAILED_S if rec.error else self.config.refresh_s):
                    wanted.append((2, rec.measured_at, a, b))
        # Joiners against busy workers: once each way, never refreshed during the job.
        busy = [w.worker_id for w in self.registry.workers.values() if w.alive and w.job_id]
        for a in idle[:MAX_PROBED_WORKERS]:
            for b in busy[:MAX_PROBED_WORKERS]:
                for pair in ((a, b), (b, a)):
                    if self.current(*pair) is None:
                        wanted.append((1, 0.0, *pair))
        wanted.sort()
        return [(a, b) for _, _, a, b in wanted]

    def step(self) -> None:
        """Start measurements for the most wanted pairs that fit the concurrency limit."""
        if len(self._tasks) >= self.config.concurrency:
            return
        now = time.monotonic()
        if now >= self._next_scan:
            self._due, self._next_scan = self._wanted(), now + RESCAN_S
        self._reach_new()
        for a, b in list(self._due):
            if len(self._tasks) >= self.config.concurrency:
                return
            if a in self._busy or b in self._busy:
                continue
            self._due.remove((a, b))
            out = self.registry.exclusions
            if out is not None and (out.excluded(a) or out.excluded(b)):
                continue  # excluded since the scan: not worth a probe
            self._busy.update((a, b))
            task = asyncio.create_task(self._measure(a, b))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _reach_new(self) -> None:
        """Call each idle worker not reached at its address yet (a cheap measurement of its
        link to itself): until one answers, the planner does not use it."""
        capacity = self.registry.capacity
        if capacity is None:
            return
        for slot in self.registry.free(unreached=True):
            if len(self._tasks) >= self.config.concurrency:
                return
            wid = slot.worker_id
            if wid in self._busy or capacity.reachable(wid, slot.address):
                continue
            if time.monotonic() < self._reach_after.get(wid, 0.0):
                continue
            self._busy.add(wid)
            task = asyncio.create_task(self._reach(wid, slot.address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reach(self, worker_id: str, address: str) -> None:
        try:
            answered = await self._call(
                worker_id, address, worker_id, address, FIRST_REACH_BYTES, 0.01
            )
            if answered:
                self._reach_failures.pop(worker_id, None)
                return
            # Tried again shortly: a worker may take a moment to answer its first call
            # (its server's own certificate arrives with its registration).
            failures = self._reach_failures[worker_id] = self._reach_failures.get(worker_id, 0) + 1
            self._reach_after[worker_id] = time.monotonic() + REACH_RETRY_S
            w = self.registry.get(worker_id)
            if (
                failures >= REACH_FAILURES
                and w is not None
                and self.registry.exclusions is not None
            ):
                await self.registry.exclusions.back_off(
                    worker_id,
                    w.name,
                    reason=f"{UNREACHABLE_REASON}{address}: {self._last_error.get(worker_id, '')}",
                    address=address,
                )
        finally:
            self._busy.discard(worker_id)

    async def _call(
        self,
        src: str,
        src_address: str,
        dst: str,
        dst_address: str,
        max_bytes: int,
        target_seconds: float,
    ) -> tuple[float, float, str] | None:
        """MeasureLinks on `src`: the figures, or None if the call reached no one. An
        answer (even a refusal) proves the coordinator reaches `src` at that address."""
        try:
            fig = await self.workers.measure_link(
                src, src_address, dst, dst_address, max_bytes, target_seconds
            )
        except WorkerCallError as e:
            self._last_error[src] = str(e)
            if e.unreachable:
                return None
            self._reached(src, src_address)
            return 0.0, 0.0, str(e)
        self._reached(src, src_address)
        return fig

    def _reached(self, worker_id: str, address: str) -> None:
        if self.registry.capacity is not None:
            self.registry.capacity.mark_reached(worker_id, address)

    async def _measure(self, src: str, dst: str) -> None:
        try:
            a, b = self.registry.get(src), self.registry.get(dst)
            if a is None or b is None:
                return
            cfg = self.config
            fig = await self._call(
                src, a.address, dst, b.address, cfg.max_bytes, cfg.target_seconds
            )
            bandwidth, rtt, error = fig or (0.0, 0.0, self._last_error.get(src, "unreachable"))
            if bandwidth > MAX_BELIEVED_BANDWIDTH_BPS:
                # No volunteer's link is that fast: the figure is refused, and the worker
                # that reported it is lying or broken.
                error = f"implausible figure {bandwidth * 8:.3g} bit/s refused"
                bandwidth, rtt = 0.0, 0.0
                if self.registry.exclusions is not None:
                    await self.registry.exclusions.back_off(
                        src,
                        a.name,
                        reason=f"reported a link to {b.name} at {error}",
                        address=a.address,
                    )
            rec = LinkRecord(src, dst, a.address, b.address, bandwidth, rtt, time.time(), error)
            self.links[(src, dst)] = rec
            if error:
                log.info("link %s -> %s not measured: %s", a.name, b.name, error)
            else:
                log.info(
                    "link %s -> %s: %.1f Mbit/s, rtt %.1f ms",
                    a.name,
                    b.name,
                    bandwidth * 8e-6,
                    rtt * 1e3,
                )
            await self._save()
        finally:
            self._busy.difference_update((src, dst))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def rows(self) -> list[dict[str, Any]]:
        """Every current figure, for `archipelago status --links`."""
        now = time.time()
        out = []
        for (src, dst), rec in sorted(self.links.items()):
            if self.current(src, dst) is None:
                continue
            out.append({**asdict(rec), "age_s": now - rec.measured_at})
        return out
