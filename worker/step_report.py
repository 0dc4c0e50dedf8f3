"""What a stage says to the coordinator: its report of each step (`StepReport`), and
where it sends reports and checkpoints (`Reporter`, the coordinator link in service)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from worker.stage_plan import StagePlan
from worker.value_guard import Suspicion


@dataclass
class StepReport:
    """What one stage did in one step (sent to the coordinator)."""

    job_id: str
    epoch: int
    stage: int
    step: int
    loss: float | None
    step_seconds: float
    sent: dict[int, int] = field(default_factory=dict)
    # Seconds the compute thread spent on this step's work (no waiting counted).
    compute_seconds: float = 0.0
    finished: bool = False
    drained: bool = False
    error: str = ""
    replica: int = 0  # which pipeline of the plan reports
    speaker: bool = False  # this replica speaks for the job (its loss, steps, checkpoints)
    sync_bytes: int = 0  # tensor bytes sent to the stage's sync group in this step
    sync_seconds: float = 0.0  # seconds this step spent exchanging with the group
    shares: int = 0  # replicas whose shares this step's average held (0: no exchange)
    staleness: int = 0  # steps since the parameters were last averaged (0 under sync)
    suspects: tuple[Suspicion, ...] = ()  # senders of refused values (no step's report)


class Reporter(Protocol):
    """Where a stage job sends its progress and checkpoints (the coordinator, in service)."""

    def progress(self, report: StepReport) -> None: ...

    async def checkpoint(
        self, plan: StagePlan, steps_done: int, tensors: Mapping[str, torch.Tensor]
    ) -> None: ...
