"""What the dashboard's pages show, as plain JSON-able dicts built from the coordinator's
own objects: the job manager, the worker registry and the link prober.

Snapshots are built on the event loop, so they read memory and keep store reads small:
each job's step metrics are read incrementally (only the steps after the last one seen),
event logs likewise, and anything slow (the plan report, the DAG layout) is cached. A
snapshot carries wall-clock times ("at", "measured_at", "last_seen_at"); the page works out
ages against the server's "now" sent beside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from coordinator.dashboard.dag_layout import layout_dag
from coordinator.dashboard.feeds import SENT_STEPS, JobRecords, StoreFeeds
from coordinator.events import CLUSTER
from coordinator.job_record import Job, JobError, PlanReport
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber
from coordinator.planning.islands import find_islands
from coordinator.planning.links import BandwidthMatrix
from coordinator.planning.plan import LinkCodec
from coordinator.registry import Registry

log = logging.getLogger("archipelago.coordinator")

# Points a curve is thinned to (every k-th, and always the last).
MAX_POINTS = 2000
# Workers drawn in the link heatmap (those with the most measured links).
MAX_MATRIX = 64
# How long a plan report (it reads every step of the plan) is reused.
REPORT_S = 5.0
# Jobs whose full metrics are held for their page (the least recently viewed go first).
DETAILED_JOBS = 32


class Snapshots:
    """The dashboard's views of the cluster and its jobs."""

    def __init__(
        self,
        *,
        manager: JobManager,
        registry: Registry,
        links: LinkProber | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.registry = registry
        self.links = links
        self.clock = clock
        self.feeds = StoreFeeds(manager)
        self._recent: dict[str, JobRecords] = {}  # last few steps, for the workers page
        self._detailed: OrderedDict[str, JobRecords] = OrderedDict()
        self._reports: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
        self._dags: dict[tuple[str, int], dict[str, Any]] = {}
        self._dense: dict[tuple[str, int], tuple[LinkCodec, ...]] = {}
        self._reporting: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._islands_key: tuple[Any, ...] = ()
        self._islands: dict[str, int] = {}
        self._matrix: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    # -- workers ---------------------------------------------------------------------------

    async def workers(self) -> dict[str, Any]:
        """Every worker: state, island, speed, memory, last heart-beat, its place in a
        job's plan and the bytes it sent in its last step; and the cluster's events."""
        now_wall, now_mono = self.clock(), time.monotonic()
        islands = self.islands()
        places: dict[str, tuple[Job, int, int]] = {}
        for job in self.manager.jobs.values():
            if job.plan is not None and not job.terminal:
                for p in job.plan.placements:
                    places[p.worker_id] = (job, p.stage, p.replica)
        sent = await self._bytes_sent({job.job_id: job for job, _, _ in places.values()})
        rows = []
        for w in self.registry.workers.values():
            place = places.get(w.worker_id) if w.alive else None
            row: dict[str, Any] = {
                "id": w.worker_id,
                "name": w.name,
                "address": w.address,
                "state": w.state.value,
                "leaving": w.leaving,
                "island": islands.get(w.worker_id, 0),
                "gflops": round(w.gflops, 2),
                "memory_bytes": w.memory_bytes,
                "device": w.device,
                "last_seen_at": round(now_wall - (now_mono - w.last_seen), 1),
                "step": w.reported[2] if w.reported[0] else None,
                # The speed the planner counts on (measured, or the claim bounded).
                "planned_gflops": round(self.registry.planning_gflops(w), 2),
            }
            exclusions = self.registry.exclusions
            exclusion = exclusions.get(w.worker_id) if exclusions is not None else None
            if exclusion is not None:
                # Shown as its state: the planner leaves it out whatever it is doing.
                row.update(
                    state="quarantined" if exclusion.until is None else "excluded",
                    excluded=exclusion.reason,
                    excluded_until=exclusion.until,
                )
            if place is not None:
                job, stage, replica = place
                row.update(
                    job_id=job.job_id,
                    job_name=job.name,
                    stage=stage,
                    replica=replica,
                    bytes_sent=sent.get((job.job_id, stage, replica)),
                )
            rows.append(row)
        return {"workers": rows, "events": await self.feeds.events(CLUSTER)}

    def _links_key(self) -> tuple[Any, ...]:
        """What the islands and the link matrix depend on, cheap to compare: the link
        figures (how many, the newest) and each worker's liveness and address."""
        assert self.links is not None
        records = self.links.links
        newest = max((r.measured_at for r in records.values()), default=0.0)
        workers = tuple((w.worker_id, w.alive, w.address) for w in self.registry.workers.values())
        return (len(records), newest, workers)

    def islands(self) -> dict[str, int]:
        """Island number (1, 2, ...) of every live worker with a measured link; recomputed
        only when the workers or the measurements change (it is quadratic in them)."""
        if self.links is None:
            return {}
        key = self._links_key()
        if key == self._islands_key:
            return self._islands
        measured: dict[tuple[str, str], tuple[float, float]] = {}
        for (src, dst), rec in self.links.links.items():
            if rec.error or rec.bandwidth <= 0 or self.links.current(src, dst) is None:
                continue
            a, b = self.registry.workers[src], self.registry.workers[dst]
            if a.alive and b.alive:
                measured[(src, dst)] = (rec.bandwidth, rec.rtt_s)
        ids = sorted({w for pair in measured for w in pair}, key=self._registration_order)
        groups = find_islands(ids, BandwidthMatrix.of(measured)) if ids else ()
        self._islands = {w: i + 1 for i, group in enumerate(groups) for w in group}
        self._islands_key = key
        return self._islands

    def _registration_order(self, worker_id: str) -> tuple[float, str]:
        w = self.registry.workers[worker_id]
        return (w.registered_at, worker_id)

    async def _bytes_sent(self, jobs: dict[str, Job]) -> dict[tuple[str, int, int], int]:
        """Bytes each (job, stage, replica) sent in its newest stored step."""
        out: dict[tuple[str, int, int], int] = {}
        for job in jobs.values():
            recent = self._recent.setdefault(job.job_id, JobRecords())
            # Only the last few steps matter here: start near the job's progress.
            await self.feeds.read(job, recent, from_step=job.steps_done - 2)
            for (stage, replica), (_step, sent) in recent.newest.items():
                out[(job.job_id, stage, replica)] = sent
        for job_id in set(self._recent) - set(jobs):
            del self._recent[job_id]
        return out

    # -- links -----------------------------------------------------------------------------

    def link_matrix(self) -> dict[str, Any]:
        """The measured links between live workers, the workers grouped by island: cells of
        (source index, destination index, bytes/s, round trip s, measured at, error)."""
        if self.links is None:
            return {"workers": [], "cells": [], "note": "link measurement is off"}
        islands = self.islands()
        if self._matrix is not None and self._matrix[0] == self._islands_key:
            return self._matrix[1]
        counts: dict[str, int] = {}
        rows = self.links.links.items()
        for (src, dst), _rec in rows:
            for w in (src, dst):
                counts[w] = counts.get(w, 0) + 1
        live = [w for w in self.registry.workers.values() if w.alive and w.worker_id in counts]
        shown = sorted(live, key=lambda w: -counts[w.worker_id])[:MAX_MATRIX]
        shown.sort(key=lambda w: (islands.get(w.worker_id, 1 << 30), w.registered_at, w.name))
        index = {w.worker_id: i for i, w in enumerate(shown)}
        cells = []
        for (src, dst), rec in rows:
            if src in index and dst in index and self.links.current(src, dst) is not None:
                cells.append(
                    [
                        index[src],
                        index[dst],
                        round(rec.bandwidth, 1),
                        round(rec.rtt_s, 6),
                        round(rec.measured_at, 1),
                        rec.error,
                    ]
                )
        note = ""
        if len(live) > len(shown):
            note = f"{len(shown)} of {len(live)} measured workers shown (the most measured)"
        matrix = {
            "workers": [
                {"id": w.worker_id, "name": w.name, "island": islands.get(w.worker_id, 0)}
                for w in shown
            ],
            "cells": cells,
            "note": note,
        }
        self._matrix = (self._islands_key, matrix)
        return matrix

    # -- jobs ------------------------------------------------------------------------------

    def jobs(self) -> dict[str, Any]:
        """Every job, newest first: state, progress and pace."""
        jobs = sorted(self.manager.jobs.values(), key=lambda j: (-j.created_at, j.job_id))
        return {"jobs": [self._job_row(j) for j in jobs]}

    @staticmethod
    def _job_row(job: Job) -> dict[str, Any]:
        steps = job.spec.steps
        running = job.state.value == "running" and job.step_seconds > 0
        plan = job.plan
        return {
            "id": job.job_id,
            "name": job.name,
            "model": job.spec.model.label,
            "state": job.state.value,
            "steps_done": job.steps_done,
            "steps": steps,
            "progress": min(1.0, job.steps_done / steps) if steps else 0.0,
            "loss": job.loss,
            "samples_per_s": job.spec.data.batch_size / job.step_seconds if running else None,
            "step_seconds": job.step_seconds or None,
            "epoch": job.epoch,
            "stages": plan.num_stages if plan is not None else None,
            "replicas": plan.replicas if plan is not None else None,
            "recoveries": job.recoveries,
            "last_checkpoint": job.last_checkpoint,
            "created_at": job.created_at,
            "error": job.error,
        }

    async def job(self, job_id: str) -> dict[str, Any]:
        """One job in full: its row, plan, curves, per-stage figures, the plan's predicted
        against measured step time, and its timeline. JobError when there is no such job."""
        job = self.manager.get(job_id)
        records = self._detailed.pop(job_id, None) or JobRecords()
        self._detailed[job_id] = records
        while len(self._detailed) > DETAILED_JOBS:
            self._detailed.popitem(last=False)
        await self.feeds.read(job, records)
        events = await self.feeds.events(job_id)
        out: dict[str, Any] = {
            "job": self._job_row(job),
            "curves": self._curves(job, records, events),
            "events": events,
            "plan": None,
        }
        plan = job.plan
        if plan is not None:
            out["plan"] = {
                "epoch": plan.epoch,
                "planner": plan.planner,
                "start_step": plan.start_step,
                "predicted_step_s": plan.predicted_step_s,
                "placements": [
                    {
                        "stage": p.stage,
                        "replica": p.replica,
                        "worker_id": p.worker_id,
                        "worker": p.worker_name,
                        "nodes": p.nodes,
                        "params": p.params,
                        "flops": p.flops,
                    }
                    for p in sorted(plan.placements, key=lambda p: (p.replica, p.stage))
                ],
                "links": self._link_figures(
                    job, records, plan.codecs or await self._dense_links(job)
                ),
                "report": self._report(job),
            }
        return out

    def _curves(
        self, job: Job, records: JobRecords, events: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """Training loss by step, validation loss by step, samples/s by wall time: each as
        [xs, ys], thinned to MAX_POINTS."""
        batch = job.spec.data.batch_size
        loss: list[tuple[float, float]] = []
        pace: list[tuple[float, float]] = []
        for step, (value, at, seconds) in records.losses.items():
            loss.append((step, value))
            if seconds > 0 and at > 0:
                pace.append((at, batch / seconds))
        pace.sort()
        validation = sorted(
            (float(e["step"]), float(e["loss"]))
            for e in events
            if e.get("kind") == "validation" and "step" in e and "loss" in e
        )
        return {
            "loss": _columns(loss),
            "validation": _columns(validation),
            "samples_per_s": _columns(pace),
        }

    def _link_figures(
        self, job: Job, records: JobRecords, codecs: tuple[LinkCodec, ...]
    ) -> list[dict[str, Any]]:
        """Each cut link of the plan: its codec and the planner's bytes per micro-batch,
        beside the bytes its source stage measured sending per step (replica 0's, the mean
        over the last 20 steps stored)."""
        plan = job.plan
        assert plan is not None
        out = []
        for c in codecs:
            last = list(records.sent.get(c.src_stage, {}).values())[-SENT_STEPS:]
            out.append(
                {
                    "src_stage": c.src_stage,
                    "dst_stage": c.dst_stage,
                    "codec": c.codec,
                    "kept": c.ratio,
                    "values": c.values,
                    "dense_bytes": c.dense_bytes,
                    "wire_bytes": c.wire_bytes,
                    "compression": c.dense_bytes / c.wire_bytes if c.wire_bytes else None,
                    "seconds": c.seconds,
                    "measured_bytes_per_step": sum(last) / len(last) if last else None,
                }
            )
        return out

    async def _dense_links(self, job: Job) -> tuple[LinkCodec, ...]:
        """The cut links of a plan that compresses nothing (it lists no codecs): every pair
        of stages a value crosses between, with the bytes of those values per micro-batch
        (the captured graph's shapes are a micro-batch's); cached per plan."""
        plan = job.plan
        assert plan is not None
        key = (job.job_id, plan.epoch)
        if key not in self._dense:
            try:
                model = await self.manager.model_of(job)
            except JobError:
                return ()  # its model is missing from the store: no figures to show
            graph, where = model.graph, plan.assignment
            crossing: dict[tuple[int, int], dict[str, int]] = {}
            for node in graph.nodes:
                dst = where.get(node.name)
                for ref in set(node.refs()):
                    src = where.get(ref)
                    if src is None or dst is None or src == dst:
                        continue
                    meta = graph.node(ref).meta
                    crossing.setdefault((src, dst), {})[ref] = meta.nbytes if meta else 0
            self._dense = {k: v for k, v in self._dense.items() if k[0] != job.job_id}
            self._dense[key] = tuple(
                LinkCodec(a, b, "none", 1.0, "fp32", sum(v.values()), sum(v.values()), 0.0)
                for (a, b), v in sorted(crossing.items())
            )
        return self._dense[key]

    def _report(self, job: Job) -> dict[str, Any] | None:
        """The plan's prediction against its measured steps, as last worked out: reading
        every step of the plan takes a while, so it is redone in the background, at most
        every REPORT_S (None until the first is done)."""
        assert job.plan is not None
        key = (job.job_id, job.plan.epoch)
        cached = self._reports.get(key)
        stale = cached is None or time.monotonic() - cached[0] >= REPORT_S
        if stale and key not in self._reporting:
            task = asyncio.create_task(self._make_report(job, key))
            self._reporting[key] = task
            task.add_done_callback(lambda _t: self._reporting.pop(key, None))
        return cached[1] if cached is not None else None

    async def _make_report(self, job: Job, key: tuple[str, int]) -> None:
        assert job.plan is not None
        try:
            report = await self.manager.plan_report(job)
        except Exception as e:  # a report is a view: its failure must not stop the page
            log.warning("dashboard: no plan report for job %s: %s", job.job_id, e)
            report = PlanReport(0.0, 0.0, 0)
        self._reports = {k: v for k, v in self._reports.items() if k[0] != job.job_id}
        self._reports[key] = (
            time.monotonic(),
            {
                "predicted_step_s": job.plan.predicted_step_s,
                "calibrated_step_s": report.calibrated_step_s,
                "measured_step_s": report.measured_step_s,
                "steps_measured": report.steps_measured,
            },
        )

    async def close(self) -> None:
        """Cancel the reports being worked out."""
        tasks = list(self._reporting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def dag(self, job_id: str) -> dict[str, Any]:
        """The job's plan drawn as a DAG (cached per plan); JobError without a plan."""
        job = self.manager.get(job_id)
        plan = job.plan
        if plan is None:
            raise JobError(f"job {job_id} has no plan yet")
        key = (job_id, plan.epoch)
        layout = self._dags.get(key)
        if layout is None:
            model = await self.manager.model_of(job)
            workers = {p.stage: p.worker_name for p in plan.placements if p.replica == 0}
            layout = await asyncio.to_thread(
                layout_dag, model.graph, plan.assignment, codecs=plan.codecs, workers=workers
            )
            layout["epoch"] = plan.epoch
            self._dags = {k: v for k, v in self._dags.items() if k[0] in self.manager.jobs}
            self._dags[key] = layout
        return layout


def _columns(points: list[tuple[float, float]]) -> list[list[float]]:
    """[xs, ys] of `points`, every k-th kept so at most MAX_POINTS remain (the last too)."""
    if len(points) > MAX_POINTS:
        k = -(-len(points) // MAX_POINTS)
        points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return [[p[0] for p in points], [p[1] for p in points]]
