"""A job's trained model back: the newest complete checkpoint, under the model's own names.

`archipelago export` asks for it (ExportModel). The tensors are the parameters and buffers
of the job's newest validated checkpoint (every stage's part stored, every tensor of the
model held; optimizer state is left out), each under the name the user's own module gives
it: the names the submitter recorded at upload (`opdag.user_model.export_names`: a loss
wrapper's prefix gone, a tied tensor under each of its names), or the graph's own names
for a zoo model or a captured `.opdag` file. A job without a checkpoint yet is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from coordinator.job_record import Job, JobError

if TYPE_CHECKING:  # the job manager's modules import the servicer's serde
    from coordinator.jobs import JobManager


async def export_tensors(
    manager: JobManager, job: Job
) -> tuple[int, list[tuple[str, torch.Tensor]]]:
    """The step of the job's newest complete checkpoint and its tensors by export name;
    JobError when it has none yet."""
    step = await manager.checkpoints.latest(job.job_id)
    if step == 0:
        every = job.spec.checkpoint.every
        raise JobError(
            f"job {job.job_id} has no complete checkpoint yet (its stages checkpoint every "
            f"{every} steps; {job.steps_done} done)"
        )
    model = await manager.model_of(job)
    state = await manager.checkpoints.resume_state(job.job_id, model, step)
    names = await manager.table.export_names_of(job)
    if not names:
        names = [(p.name, p.name) for p in model.graph.params]
    missing = sorted({tensor for _, tensor in names if tensor not in state})
    if missing:
        raise JobError(f"job {job.job_id}: the checkpoint of step {step} lacks {missing[:3]}")
    return step, [(name, state[tensor]) for name, tensor in names]
