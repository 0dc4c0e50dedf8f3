"""What a worker is told to run: one stage of one job, in one replica of its plan.

Plain data, decoded and checked by `worker.serde` from the coordinator's stage assignment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opdag.data import DataConfig
from opdag.ir import Graph
from opdag.optim import OptimizerConfig
from worker.edge_compression import EdgeCodec


@dataclass(frozen=True)
class StagePlan:
    """Everything a worker needs to run one stage of a job. `peers` are the other stages
    of this stage's replica (its own pipeline); `sync_peers` the workers holding this
    stage in the other replicas, by replica: its sync group."""

    job_id: str
    epoch: int
    stage: int
    num_stages: int
    graph: Graph
    peers: Mapping[int, str]
    # value name -> stages it goes to / the stage it comes from
    sends: Mapping[str, tuple[int, ...]]
    receives: Mapping[str, int]
    # data input name -> stages that read it (stage 0 loads the batch and sends them)
    data_routes: Mapping[str, tuple[int, ...]]
    data: DataConfig
    context: int | None
    fingerprint: str
    optimizer: OptimizerConfig
    start_step: int
    total_steps: int
    checkpoint_every: int
    job_secret: str
    # dst stage -> how what this stage sends there is compressed
    codecs: Mapping[int, EdgeCodec] = field(default_factory=dict)
    replica: int = 0
    replicas: int = 1
    sync_peers: Mapping[int, str] = field(default_factory=dict)
    # How the replicas keep together: "sync" (gradients averaged every step) or "local-sgd"
    # (each replica steps alone; parameters averaged every `sync_period` steps).
    sync_kind: str = "sync"
    sync_period: int = 1

    @property
    def local_sgd(self) -> bool:
        """Whether the replicas step their own optimizers and average parameters."""
        return self.replicas > 1 and self.sync_kind == "local-sgd"

    def averages_parameters_after(self, step: int) -> bool:
        """Whether step `step` (of the whole run) ends a local-sgd averaging round: every
        `sync_period`-th step, and the run's last, so the run ends with one model."""
        return self.local_sgd and (
            (step + 1) % self.sync_period == 0 or step == self.total_steps - 1
        )

    @property
    def local_micro_batches(self) -> int:
        """The micro-batches of a step this replica runs (its share of the global batch)."""
        return self.data.micro_batches // self.replicas

    @property
    def loads_data(self) -> bool:
        return self.stage == 0

    @property
    def data_inputs(self) -> tuple[str, ...]:
        """The data inputs this stage's graph reads."""
        return tuple(n for n in self.graph.inputs if n not in self.receives)

    def forward_sources(self) -> set[int]:
        """Stages that send this stage a message for every micro-batch's forward."""
        srcs = set(self.receives.values())
        if not self.loads_data and self.data_inputs:
            srcs.add(0)
        return srcs

    def backward_sources(self) -> set[int]:
        """Stages that send gradients back to this stage (those reading a value of ours
        that carries a gradient)."""
        srcs: set[int] = set()
        for name, dsts in self.sends.items():
            meta = self.graph.node(name).meta
            if meta is not None and meta.carries_grad:
                srcs.update(dsts)
        return srcs
