"""Calibrating the compute model on what the running stages measure.

Plans are priced with a `ComputeModel`. Each stage reports the compute seconds of its
steps; once a stage of a plan has a few steps, the model is refit from every stage
profiled so far (starting from the model a previous coordinator left), stored, and used
by every later plan and prediction.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from coordinator.job_record import Job, Progress
from coordinator.link_survey import LinkProber
from coordinator.planning.compute import ComputeModel, StageTiming, fit_compute_model
from coordinator.planning.jobspec import JobSpec
from coordinator.planning.plan import Plan
from coordinator.planning.planner import predict
from coordinator.registry import Registry
from coordinator.store import StateStore
from opdag.ir import Graph
from opdag.partition import Partition

log = logging.getLogger("archipelago.coordinator")

# The steps a stage is profiled for before calibrating.
PROFILE_STEPS = 3
# The calibrated compute model, kept so a restarted coordinator plans as well at once.
COMPUTE_MODEL_KEY = "compute-model"

# (job id, plan epoch, stage index)
StageKey = tuple[str, int, int]


class ComputeCalibration:
    """The compute model plans are made with, and the stage profiles it is fit on."""

    def __init__(self, store: StateStore, registry: Registry, links: LinkProber | None) -> None:
        self.store = store
        self.registry = registry
        self.links = links
        self.model = ComputeModel()
        self._prior_model = self.model  # what the store held at start
        self._timings: dict[str, StageTiming] = {}
        self._compute_samples: dict[StageKey, list[float]] = {}
        self._profiled: dict[StageKey, int] = {}
        self._stage_flops: dict[StageKey, tuple[float, float, int]] = {}

    @property
    def calibrated(self) -> bool:
        """Whether any stage of any plan has been profiled (here or by a coordinator before)."""
        return self.model != ComputeModel()

    async def load(self) -> None:
        """Take back the model a previous coordinator stored."""
        blob = await asyncio.to_thread(self.store.get_blob, COMPUTE_MODEL_KEY)
        if blob is None:
            return
        try:
            self.model = ComputeModel.from_dict(json.loads(blob))
            self._prior_model = self.model
        except (ValueError, TypeError, AttributeError) as e:
            log.warning("stored compute model unreadable (%s); calibrating afresh", e)

    def save(self) -> Coroutine[Any, Any, None]:
        """The store write of the model as it is now, and of the workers' measured speeds
        (for the caller to await or spawn)."""
        blob = json.dumps(self.model.to_dict()).encode()
        return self._save(blob)

    async def _save(self, blob: bytes) -> None:
        await asyncio.to_thread(self.store.put_blob, COMPUTE_MODEL_KEY, blob)
        if self.registry.capacity is not None:
            await self.registry.capacity.flush()

    def new_plan(self, job_id: str, epoch: int, cut: Partition) -> None:
        """A job was planned again: drop its earlier plans' profiles and note the FLOPs of
        each stage of the new one, which its measured seconds are fit against."""
        self.forget(job_id)
        for stage in cut.stages:
            g = stage.graph
            self._stage_flops[(job_id, epoch, stage.index)] = (
                g.total("fwd_flops"),
                g.total("bwd_flops"),
                len(g.compute_nodes),
            )

    def forget(self, job_id: str) -> None:
        """Drop the per-stage profiling state of a job's earlier plans (the fitted model
        keeps what was learnt from them)."""
        for table in (self._compute_samples, self._profiled, self._stage_flops):
            for key in [k for k in table if k[0] == job_id]:
                del table[key]

    def observe(self, job: Job, p: Progress) -> bool:
        """Record a stage's measured compute time; once a stage has a few steps of this
        plan, refit the model. True when it was refit (and should be stored)."""
        plan = job.plan
        if plan is None or p.compute_seconds <= 0 or p.stage >= plan.num_stages:
            return False
        placement = plan.placements[p.stage]
        key = (job.job_id, plan.epoch, p.stage)
        if p.step == plan.start_step:
            return False  # the first step of a plan warms up: leave it out
        seen = self._compute_samples.setdefault(key, [])
        seen.append(p.compute_seconds)
        del seen[: -4 * PROFILE_STEPS]
        n = self._profiled[key] = self._profiled.get(key, 0) + 1
        # Refit once a stage has a few steps, then every tenth step: not on every report.
        if n < PROFILE_STEPS or (n - PROFILE_STEPS) % 10:
            return False
        w = self.registry.get(placement.worker_id)
        stage = self._stage_flops.get(key)
        if w is None or stage is None:
            return False
        fwd, bwd, nodes = stage
        # A replica runs its share of the step's micro-batches (reports come from replica 0).
        per_mb = statistics.median(seen) / (job.spec.data.micro_batches // plan.replicas)
        if self.registry.capacity is not None and per_mb > 0:
            # The profile is the worker's measurement: its stage's FLOPs over their seconds.
            self.registry.capacity.note(w.worker_id, w.name, w.gflops, (fwd + bwd) / per_mb)
        if self.registry.planning_gflops(w) <= 0:
            return False
        share = fwd / (fwd + bwd) if fwd + bwd > 0 else 0.5
        self._timings[placement.worker_id] = StageTiming(
            placement.worker_id, 0.0, fwd, bwd, nodes, per_mb * share, per_mb * (1 - share)
        )
        # Every stage is fit against the speed believed for its worker now: efficiencies
        # stay relative to the figure the planner multiplies them with.
        timings = [replace(t, gflops=self._believed(t.worker_id)) for t in self._timings.values()]
        timings = [t for t in timings if t.gflops > 0]
        self.model = fit_compute_model(timings, prior=self._prior_model)
        return True

    def _believed(self, worker_id: str) -> float:
        w = self.registry.get(worker_id)
        return self.registry.planning_gflops(w) if w is not None else 0.0

    async def predicted_step_s(self, plan: Plan, graph: Graph, spec: JobSpec) -> float:
        """The plan's step time predicted again with the model as calibrated now."""
        speeds = {pl.worker_id: self._believed(pl.worker_id) for pl in plan.placements}
        figures = self.links.figures(speeds) if self.links else {}
        return await asyncio.to_thread(predict, plan, graph, spec, speeds, figures, self.model)
