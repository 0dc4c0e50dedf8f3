"""What the user's client shows of the coordinator: jobs, workers, links and plans, as plain
data (`archipelago.serde` builds them from the coordinator's answers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageView:
    stage: int
    worker_id: str
    worker_name: str
    address: str
    nodes: int
    params: int
    flops: float
    replica: int = 0  # which pipeline of the plan


@dataclass(frozen=True)
class StepView:
    step: int
    loss: float
    step_seconds: float
    bytes: int
    epoch: int


@dataclass(frozen=True)
class JobView:
    job_id: str
    name: str
    state: str
    steps: int
    steps_done: int
    loss: float | None
    samples_per_s: float
    eta_s: float
    epoch: int
    last_checkpoint: int
    error: str
    bytes_per_step: int
    batch_size: int
    recoveries: int
    created_at: float
    stages: tuple[StageView, ...] = ()
    metrics: tuple[StepView, ...] = field(default_factory=tuple)

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    name: str
    address: str
    state: str
    job_id: str
    gflops: float
    memory_bytes: int
    device: str
    last_seen_s: float


@dataclass(frozen=True)
class LinkView:
    """One measured directed link between two workers."""

    src: str
    dst: str
    src_name: str
    dst_name: str
    bandwidth: float  # bytes per second
    rtt_s: float
    age_s: float


@dataclass(frozen=True)
class PlanView:
    """A job's plan explained, with its predicted and measured step times."""

    job_id: str
    epoch: int
    planner: str
    text: str
    predicted_step_s: float
    measured_step_s: float
    calibrated_step_s: float
