"""What the coordinator hands one worker for one stage of a plan: plain data.

`coordinator.serde` turns it into the worker API's message; the job life cycle builds it
without seeing any generated class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from coordinator.planning.jobspec import JobSpec
from coordinator.planning.plan import Plan
from coordinator.planning.stage_sync import SyncLayer
from opdag.partition import Stage


@dataclass(frozen=True)
class StageHandover:
    """A stage with its place in the plan (its replica too), its routes, data, optimizer
    and tensors."""

    job_id: str
    epoch: int
    stage: Stage
    plan: Plan
    routes: Mapping[str, Mapping[str, tuple[int, ...]]]
    spec: JobSpec
    fingerprint: str
    start_step: int
    secret: str
    tensors: Sequence[tuple[str, torch.Tensor]]
    replica: int = 0
    # partial-local-sgd: the stage's layers and the iterations that average each.
    sync_layers: Sequence[SyncLayer] = ()
