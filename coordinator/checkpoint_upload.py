"""A stage's checkpoint as a worker uploads it: which job, epoch and stage it is for, how
its tensors are taken in, and what they must be to be kept.

The servicer decodes the stream's header and hands it here with the tensors still on the
wire; they are read only once the job is known to be current, and no more bytes than its
graph's state may take. Then the part is checked (`check_checkpoint_part`): every tensor of
the stage and nothing else, each shaped and typed as the model has it (optimizer state
shaped as its parameter or one number, of the same kinds for each), every value finite and
below an absolute ceiling. A part that fails is refused and nothing is stored; one whose
values are not finite is the uploader's own state gone bad (an upload comes only from the
worker the plan gave that stage), so the uploader is quarantined and the job planned again
without it (`Quarantine.own_values`). Plain code over the job manager: a test feeds it an in-memory
stream.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from coordinator.job_record import JobError
from opdag.ir import CapturedModel, ParamSpec, dtype_name
from opdag.optim import max_state_bytes, optimizer_param_name
from proto.streams import IncomingTensors

if TYPE_CHECKING:  # the job manager's modules import the serde that imports this
    from coordinator.jobs import JobManager

# |x| at or above this in a checkpoint is refused, as in any value a worker receives.
VALUE_CEILING = 1e30
# The prefix of the outer optimizer's state kinds (`worker.replica_sync`: outer_anchor,
# outer_velocity), which every trainable parameter has, with a gradient or not.
OUTER_STATE = "outer_"


class CheckpointValuesRefused(JobError):
    """A checkpoint part holding values that are not finite (or beyond the ceiling)."""


@dataclass(frozen=True)
class CheckpointUpload:
    """The header of one stage's checkpoint: where it belongs (its tensors follow)."""

    worker_id: str
    job_id: str
    epoch: int
    stage: int
    num_stages: int
    step: int


def check_checkpoint_part(
    model: CapturedModel,
    stage_params: Mapping[str, ParamSpec] | None,
    tensors: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Refuse (JobError, CheckpointValuesRefused for bad values) a stage's checkpoint part
    that lacks a tensor of the stage (`stage_params`; None: only the model's tensors are
    known), holds another, is shaped or typed otherwise than the model, carries optimizer
    state of only some parameters, or holds values that are not finite."""
    specs = {p.name: p for p in model.graph.params}
    if stage_params is not None:
        missing = sorted(set(stage_params) - set(tensors))
        if missing:
            raise JobError(f"{what} lacks {len(missing)} tensor(s) of the stage: {missing[:3]}")
        specs = dict(stage_params)
    optim_keys: dict[str, set[str]] = {}
    for name, t in tensors.items():
        owner = optimizer_param_name(name)
        spec = specs.get(owner or name)
        if spec is None:
            raise JobError(f"{what}: tensor {name!r} is not one of the stage's")
        if owner is None:
            if tuple(t.shape) != tuple(spec.shape) or dtype_name(t.dtype) != spec.dtype:
                raise JobError(
                    f"{what}: {name!r} is {dtype_name(t.dtype)}{list(t.shape)}, the model's "
                    f"is {spec.dtype}{list(spec.shape)}"
                )
        else:
            key = name.rpartition("/")[2]
            if not key.startswith(OUTER_STATE):  # local SGD's outer state: every parameter
                optim_keys.setdefault(owner, set()).add(key)
            if tuple(t.shape) != tuple(spec.shape) and t.numel() != 1:
                raise JobError(
                    f"{what}: optimizer state {name!r} shaped {list(t.shape)} is neither "
                    f"its parameter's {list(spec.shape)} nor one number"
                )
        if t.dtype.is_floating_point and t.numel():
            top = float(t.detach().abs().amax())
            if not math.isfinite(top) or top >= VALUE_CEILING:
                raise CheckpointValuesRefused(
                    f"{what}: {name!r} holds "
                    + ("values that are not finite" if not math.isfinite(top) else f"|x| {top:.3g}")
                )
    # Every parameter with optimizer state has the same kinds of it (a parameter that never
    # had a gradient has none, which an optimizer allows).
    if len({frozenset(k) for k in optim_keys.values()}) > 1:
        raise JobError(f"{what}: parameters carry different kinds of optimizer state")


async def receive_checkpoint(
    manager: JobManager, upload: CheckpointUpload, incoming: IncomingTensors
) -> None:
    """Read the checkpoint's tensors, check them and hand them to the job manager;
    StaleReport for a job or epoch no longer current, WireError for tensors that are not
    what they claim, JobError for a part that fails the checks (nothing is stored)."""
    job = manager.current_job(upload.job_id, upload.epoch)
    model = await manager.model_of(job)
    tensors = dict(await incoming.read(max_bytes=max_state_bytes(model.graph)))
    what = f"the checkpoint of stage {upload.stage} at step {upload.step}"
    stage_params = manager.checkpoints.stage_params(upload.job_id, upload.epoch, upload.stage)
    try:
        await asyncio.to_thread(check_checkpoint_part, model, stage_params, tensors, what)
    except CheckpointValuesRefused as e:
        await manager.quarantine.own_values(job, upload.worker_id, str(e), for_good=True)
        manager.lifecycle.recover_later(job, f"quarantined the uploader of {e}")
        raise
    await manager.on_checkpoint(
        job_id=upload.job_id,
        epoch=upload.epoch,
        stage=upload.stage,
        num_stages=upload.num_stages,
        step=upload.step,
        tensors=tensors,
    )
