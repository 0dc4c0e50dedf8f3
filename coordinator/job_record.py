"""A job as the coordinator holds and stores it, and the plain data about its steps.

`Job.record` is what the store keeps; `Job.from_record` reads it back (its state through
`JobState.parse`). `Progress` is one stage's report of one step (or of the senders whose
values it refused, `Suspect`), `PlanReport` a plan's prediction against what its steps
measured.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import Plan
from coordinator.states import JOB_ENDED, JobState
from opdag.errors import OpDagError


class JobError(OpDagError):
    """A request about a job that cannot be met (unknown id, bad spec)."""


class StaleReport(OpDagError):
    """A report from an epoch the job has moved on from."""


@dataclass
class Job:
    """A job as the coordinator holds it."""

    job_id: str
    name: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    epoch: int = 0
    steps_done: int = 0
    last_checkpoint: int = 0
    error: str = ""
    recoveries: int = 0
    fruitless: int = 0
    progress_mark: int = 0
    loss: float | None = None
    # The held-out loss of the newest checkpoint evaluated (`coordinator.validation`).
    val_loss: float | None = None
    val_step: int = 0
    step_seconds: float = 0.0
    bytes_per_step: int = 0
    fingerprint: str = ""
    finished_stages: set[int] = field(default_factory=set)
    drained_stages: set[int] = field(default_factory=set)
    # The replica whose reports set the job's progress, and whether it is the only one
    # the plan still has (after a lost replica: `coordinator.elastic`).
    speaker: int = 0
    alone: bool = False
    # Memory only.
    plan: Plan | None = None
    # The quarantine that broke the current plan: the reason its re-plan gives, whichever
    # report (the accuser's, or the refused sender's own failure) arrives first.
    blame: str = ""
    draining_until: float = 0.0
    running_since: float = 0.0
    waiting_since: float = 0.0
    version: int = 0
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def terminal(self) -> bool:
        return self.state in JOB_ENDED

    def replica_of(self, worker_id: str) -> int | None:
        """Which replica of the current plan `worker_id` runs (None: none of it)."""
        if self.plan is not None:
            for p in self.plan.placements:
                if p.worker_id == worker_id:
                    return p.replica
        return None

    def speaks(self, worker_id: str) -> bool:
        """Whether `worker_id`'s reports set the job's progress: it runs a stage of the
        speaking replica."""
        return self.replica_of(worker_id) == self.speaker

    def dropped(self, worker_id: str) -> bool:
        """Whether `worker_id` ran a replica the job no longer has (or is not in the plan)."""
        replica = self.replica_of(worker_id)
        return replica is None or (self.alone and replica != self.speaker)

    def record(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "name": self.name,
            "spec": self.spec.to_dict(),
            "state": self.state.value,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "last_checkpoint": self.last_checkpoint,
            "error": self.error,
            "recoveries": self.recoveries,
            "fruitless": self.fruitless,
            "progress_mark": self.progress_mark,
            "loss": self.loss,
            "val_loss": self.val_loss,
            "val_step": self.val_step,
            "step_seconds": self.step_seconds,
            "bytes_per_step": self.bytes_per_step,
            "fingerprint": self.fingerprint,
            "finished_stages": sorted(self.finished_stages),
            "drained_stages": sorted(self.drained_stages),
            "speaker": self.speaker,
            "alone": self.alone,
        }

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> Job:
        return cls(
            job_id=r["job_id"],
            name=r["name"],
            spec=parse_job_spec(yaml.safe_dump(r["spec"])),
            state=JobState.parse(r["state"]),
            created_at=r["created_at"],
            updated_at=r["updated_at"],
            epoch=r["epoch"],
            steps_done=r["steps_done"],
            last_checkpoint=r["last_checkpoint"],
            error=r["error"],
            recoveries=r["recoveries"],
            fruitless=r.get("fruitless", 0),
            progress_mark=r.get("progress_mark", 0),
            loss=r["loss"],
            val_loss=r.get("val_loss"),
            val_step=r.get("val_step", 0),
            step_seconds=r["step_seconds"],
            bytes_per_step=r["bytes_per_step"],
            fingerprint=r["fingerprint"],
            finished_stages=set(r["finished_stages"]),
            drained_stages=set(r["drained_stages"]),
            speaker=r.get("speaker", 0),
            alone=r.get("alone", False),
        )


@dataclass(frozen=True)
class Suspect:
    """A sender whose value a stage refused, as the stage reports it: which stage of which
    replica sent it (`kind` "activation" or "gradient": a stage of the reporter's replica;
    "share": the reporter's stage in another replica; "spot-check": a stage of the
    reporter's replica whose recomputed micro-batch differs from what the reporter received,
    `coordinator.spot_checks`), at which step, and the evidence."""

    kind: str
    stage: int
    replica: int
    step: int
    evidence: str
    norm: float = math.nan
    bound: float = math.nan


@dataclass(frozen=True)
class Progress:
    """One stage's report of one step, from one replica (decoded from the wire)."""

    worker_id: str
    job_id: str
    epoch: int
    stage: int
    step: int
    loss: float | None
    step_seconds: float
    sent: Mapping[int, int]
    finished: bool
    drained: bool
    error: str
    compute_seconds: float = 0.0
    replica: int = 0  # which pipeline of the plan reports
    sync_bytes: int = 0  # tensor bytes the stage sent to its sync group in this step
    sync_seconds: float = 0.0  # seconds the step spent exchanging with the group
    staleness: int = 0  # steps since the stage's parameters were last averaged
    shares: int = 0  # replicas' shares the step's average held (0: no exchange)
    speaker: bool = False  # the replica whose loss, steps and pace are the job's
    suspects: tuple[Suspect, ...] = ()  # senders of values the stage refused


@dataclass(frozen=True)
class StageTimes:
    """One stage's seconds per step, predicted and measured: computing (forwards,
    backwards, optimizer step), and the rest of its step, waiting on transfers and on the
    other stages (compression runs beside compute, so its time shows as waiting only when
    it holds a transfer up). Measured figures are means over the plan's steps so far."""

    stage: int
    predicted_compute_s: float
    predicted_wait_s: float
    measured_compute_s: float = 0.0
    measured_wait_s: float = 0.0
    steps_measured: int = 0


@dataclass(frozen=True)
class PlanReport:
    """How a plan's prediction compares with what its steps measured."""

    measured_step_s: float
    calibrated_step_s: float
    steps_measured: int
    stages: tuple[StageTimes, ...] = ()
