"""A stage's checkpoint as a worker uploads it: which job, epoch and stage it is for, and
how its tensors are taken in.

The servicer decodes the stream's header and hands it here with the tensors still on the
wire; they are read only once the job is known to be current, and no more bytes than its
graph's state may take. Plain code over the job manager: a test feeds it an in-memory
stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from opdag.optim import max_state_bytes
from proto.streams import IncomingTensors

if TYPE_CHECKING:  # the job manager's modules import the serde that imports this
    from coordinator.jobs import JobManager


@dataclass(frozen=True)
class CheckpointUpload:
    """The header of one stage's checkpoint: where it belongs (its tensors follow)."""

    worker_id: str
    job_id: str
    epoch: int
    stage: int
    num_stages: int
    step: int


async def receive_checkpoint(
    manager: JobManager, upload: CheckpointUpload, incoming: IncomingTensors
) -> None:
    """Read the checkpoint's tensors and hand them to the job manager; StaleReport for a
    job or epoch no longer current, WireError for tensors that are not what they claim."""
    job = manager.current_job(upload.job_id, upload.epoch)
    model = await manager.model_of(job)
    tensors = await incoming.read(max_bytes=max_state_bytes(model.graph))
    await manager.on_checkpoint(
        job_id=upload.job_id,
        epoch=upload.epoch,
        stage=upload.stage,
        num_stages=upload.num_stages,
        step=upload.step,
        tensors=dict(tensors),
    )
