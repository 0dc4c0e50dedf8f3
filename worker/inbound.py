"""What a worker does with the tensor streams it is sent: a stage from the coordinator, and
values or gradients from a peer stage, a replica's gradients from its sync group.

The servicer decodes the stream's header and hands it here with the tensors still on the
wire; these size what may arrive from what the stage holds, read it, and give it to the
node. Plain functions of their arguments: a test feeds them an in-memory stream.
"""

from __future__ import annotations

from opdag.errors import CodecError
from opdag.optim import max_state_bytes
from proto.streams import IncomingTensors
from worker.node import WorkerNode
from worker.serde import GradientShare, StagePlan, Transfer
from worker.stage_job import StageJob
from worker.transfer_kind import TransferKind


async def receive_stage(node: WorkerNode, plan: StagePlan, incoming: IncomingTensors) -> None:
    """Read a stage's tensors (no more than its graph's state may take) and load it."""
    tensors = await incoming.read(max_bytes=max_state_bytes(plan.graph))
    await node.load_stage(plan, dict(tensors))


async def receive_transfer(
    node: WorkerNode,
    job: StageJob,
    kind: TransferKind,
    transfer: Transfer,
    incoming: IncomingTensors,
) -> None:
    """Read one peer transfer for `job` (no more bytes than its graph says the sending
    stage's values take) and hand its values to the job."""
    limit = job.expected_bytes(kind, transfer.src_stage)
    values = await incoming.read_values(max_bytes=limit, device=node.device)
    await node.deliver(job, kind, transfer.step, transfer.micro_batch, transfer.src_stage, values)


async def receive_gradient_share(
    job: StageJob, share: GradientShare, incoming: IncomingTensors
) -> None:
    """Read one replica's gradients of `job`'s stage (no more bytes than the stage's
    gradients take) and hand them to the stage's sync group."""
    if job.sync is None or share.stage != job.plan.stage:
        raise CodecError(f"this worker holds no replica of stage {share.stage} to average")
    tensors = await incoming.read(max_bytes=job.sync.max_bytes())
    await job.sync.deliver(share.step, share.src_replica, tensors)
