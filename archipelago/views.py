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
class ReplicaView:
    """One replica (pipeline) over the job's recent steps."""

    replica: int
    last_step: int
    steps: int  # how many recent steps the figures cover
    samples_per_s: float  # its share of the batch over its step time
    sync_bytes_per_step: int  # sent to its sync groups, all its stages together
    sync_seconds_per_step: float  # its slowest stage's exchange with its group
    staleness: int  # steps since its stages were last averaged
    speaker: bool  # its loss and pace are the job's


@dataclass(frozen=True)
class GroupView:
    """One stage's sync group (its replicas) over the job's recent steps."""

    stage: int
    replicas: tuple[int, ...]
    steps: int
    sync_bytes_per_step: int  # all members together
    sync_seconds_per_step: float  # the slowest member's exchange
    staleness: int
    rounds: int  # recent steps that averaged parameters (or gradients)
    shares: int  # shares the latest average held


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
    # Only when asked for with the metrics.
    replica_metrics: tuple[ReplicaView, ...] = ()
    group_metrics: tuple[GroupView, ...] = ()
    # The held-out loss of the newest checkpoint evaluated (None: none yet), and its step.
    val_loss: float | None = None
    val_step: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")

    @property
    def replicas(self) -> int:
        """How many pipelines the current plan runs (0 before it has one)."""
        return len({s.replica for s in self.stages})


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
    # Why it is left out of planning now ("": it is not), for how long (0: for good).
    excluded: str = ""
    excluded_for_s: float = 0.0
    planned_gflops: float = 0.0  # what the planner counts on (its claim is `gflops`)
    reachable: bool = True  # the coordinator's call was answered at its address
    relayed: bool = False  # reached through the coordinator's relay (`--outbound-only`)


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
    # Per stage: (stage, predicted compute, predicted wait, measured compute, measured wait,
    # steps measured), seconds per step.
    stages: tuple[tuple[int, float, float, float, float, int], ...] = ()


@dataclass(frozen=True)
class EventView:
    """One event of a job's timeline or of the cluster's."""

    seq: int
    at: float  # wall clock
    kind: str
    text: str
    epoch: int = 0
    step: int = 0
    worker_id: str = ""
    worker_name: str = ""
    reason: str = ""
    loss: float | None = None  # validation events


@dataclass(frozen=True)
class RecordView:
    """One stored step record: one stage of one replica at one step (None: not recorded)."""

    step: int
    stage: int
    replica: int
    epoch: int
    loss: float | None  # the speaker's last stage
    replica_loss: float | None  # another replica's last stage
    step_seconds: float
    compute_seconds: float
    samples: float  # the replica's share of the batch
    bytes: int  # sent to the other stages of its pipeline
    sync_bytes: int  # sent to its sync group
    sync_seconds: float
    staleness: int
    shares: int
    at: float  # wall clock when the coordinator stored it
    speaker: bool
