"""What a worker is told to run: one stage of one job, in one replica of its plan.

Plain data, decoded and checked by `worker.serde` from the coordinator's stage assignment.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from opdag.data import DataConfig
from opdag.ir import Graph
from opdag.optim import OptimizerConfig
from worker.edge_compression import EdgeCodec
from worker.value_guard import ValueBounds

# The sync policies this worker carries out (`worker.replica_sync`).
SYNC_KINDS_RUN = ("sync", "local-sgd", "partial-local-sgd")


@dataclass(frozen=True)
class SyncLayer:
    """partial-local-sgd: one layer of the stage, its parameters and the iterations of the
    period after which it is averaged (its scheduled one first, then extra syncs)."""

    name: str
    params: tuple[str, ...]
    iterations: tuple[int, ...]


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
    # other stage of this replica -> the secret it and this stage share (transfers carry it)
    pair_secrets: Mapping[int, str]
    # dst stage -> how what this stage sends there is compressed
    codecs: Mapping[int, EdgeCodec] = field(default_factory=dict)
    replica: int = 0
    replicas: int = 1
    sync_peers: Mapping[int, str] = field(default_factory=dict)
    # Who the plan put at each peer's address (stage -> worker id; replica -> worker id):
    # a TLS channel verifies that worker's name ("" for none).
    peer_ids: Mapping[int, str] = field(default_factory=dict)
    sync_peer_ids: Mapping[int, str] = field(default_factory=dict)
    # How the replicas keep together: "sync" (gradients averaged every step), "local-sgd"
    # (each replica steps alone; parameters averaged every `sync_period` steps) or
    # "partial-local-sgd" (each of `sync_layers` averaged at its own iterations).
    sync_kind: str = "sync"
    sync_period: int = 1
    sync_layers: tuple[SyncLayer, ...] = ()
    # How averaged tensors travel: fp32 (as they are) or fp16.
    sync_values: str = "fp32"
    # The local kinds' outer optimizer (DiLoCo) as (sgd | nesterov, lr, momentum); None:
    # the averaged parameters are taken as they are.
    outer: tuple[str, float, float] | None = None
    # The secret of this stage's sync group ("" with one replica).
    sync_secret: str = ""
    # How the group's shares are combined: mean, median or trimmed-mean (the robust two
    # leave out outliers first: `worker.robust_aggregate`).
    sync_aggregate: str = "mean"
    # The bounds this stage puts on the values it receives (the job's `trust.values`).
    value_bounds: ValueBounds = field(default_factory=ValueBounds)
    # Steps whose inputs and parameters the stage keeps for the coordinator's spot checks
    # (`worker.spot_evidence`); 0: none are kept.
    spot_keep: int = 0
    # Forwards every stage runs beyond 1F1B's warm-up before its first backward (the plan's
    # schedule depth, `opdag.schedule`); the same for every stage of the pipeline.
    warmup_extra: int = 0

    @property
    def local_sgd(self) -> bool:
        """Whether the replicas step their own optimizers and average parameters."""
        return self.replicas > 1 and self.sync_kind in ("local-sgd", "partial-local-sgd")

    def averages_parameters_after(self, step: int) -> bool:
        """Whether step `step` (of the whole run) ends a local-sgd averaging round: every
        `sync_period`-th step, and the run's last, so the run ends with one model."""
        return self.local_sgd and (
            (step + 1) % self.sync_period == 0 or step == self.total_steps - 1
        )

    def layers_averaged_after(self, step: int) -> tuple[SyncLayer, ...]:
        """partial-local-sgd: the layers averaged after step `step` (all after the last)."""
        if step == self.total_steps - 1:
            return self.sync_layers
        return tuple(la for la in self.sync_layers if step % self.sync_period in la.iterations)

    def averaged_after(self, step: int, names: Iterable[str]) -> set[str]:
        """Which of the stage's parameters `names` are averaged after step `step`."""
        if self.sync_kind == "partial-local-sgd" and self.local_sgd:
            due = {p for la in self.layers_averaged_after(step) for p in la.params}
            return {n for n in names if n in due}
        return set(names) if self.averages_parameters_after(step) else set()

    def sync_problem(self) -> str | None:
        """What makes the sync policy one this worker cannot run, or None."""
        if self.sync_kind not in SYNC_KINDS_RUN or not 1 <= self.sync_period <= 10_000:
            return f"sync {self.sync_kind!r} every {self.sync_period} steps is not run here"
        if self.sync_values not in ("fp32", "fp16"):
            return f"sync values {self.sync_values!r} are not fp32 or fp16"
        if self.sync_aggregate not in ("mean", "median", "trimmed-mean"):
            return f"sync aggregate {self.sync_aggregate!r} is not mean, median or trimmed-mean"
        if self.outer is not None:
            name, lr, momentum = self.outer
            if self.sync_kind == "sync" or name not in ("sgd", "nesterov"):
                return f"outer optimizer {name!r} is not one of a local kind"
            if not (0 < lr < math.inf and 0 <= momentum < 1):
                return f"outer optimizer lr {lr} and momentum {momentum} are out of range"
        if self.sync_kind != "partial-local-sgd" or self.replicas < 2:
            # One replica has nobody to average with: no layers to schedule.
            return "sync layers are only for partial-local-sgd" if self.sync_layers else None
        trainable = {p.name for p in self.graph.params if p.trainable}
        named = [p for la in self.sync_layers for p in la.params]
        if len(named) != len(set(named)) or set(named) != trainable:
            return "the sync layers must hold every trainable parameter of the stage once"
        for la in self.sync_layers:
            its = la.iterations
            if not its or len(set(its)) != len(its) or max(its) >= self.sync_period:
                return f"layer {la.name!r}: iterations {list(its)} do not fit the period"
        return None

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
