"""A real worker gRPC server holding one replica of a stage refuses every ReplicaGradients
call that is not its sync group's, with a status naming the problem, and keeps serving:
a correct share from the other replica is accepted afterwards, and only once."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

from coordinator.handover import StageHandover
from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import WorkerSlot, plan_even, stage_routes
from coordinator.serde import stage_assignment_pb
from opdag.capture import capture
from opdag.zoo import build_model, example_batch
from proto import worker_pb2
from proto.rpc import coordinator_metadata, token_metadata
from proto.tensor_stream import header_of, iter_chunks
from tests.multiproc.test_worker_rejects_bad_messages import (
    CALL_TIMEOUT_S,
    COORDINATOR_CREDENTIAL,
    SPEC,
    TOKEN,
    InProcessWorker,
)
from worker.replica_sync import LOSS

pytestmark = pytest.mark.multiproc

JOB_ID = "replica-job"
EPOCH = 2


class Holder:
    """The in-process worker holding stage 1 of replica 0 (of 2 stages x 2 replicas), and
    the assignment it was given."""

    def __init__(self, worker: InProcessWorker) -> None:
        self.worker = worker
        spec = parse_job_spec(
            SPEC.replace("micro_batches: 2", "micro_batches: 4").replace(
                "batch_size: 4", "batch_size: 8"
            )
        )
        args = spec.model.args_dict()
        model = build_model(spec.model.zoo, args, seed=spec.seed)
        example = example_batch(spec.model.zoo, args, spec.data.micro_batch_size, device="meta")
        captured = capture(model, example, name=spec.model.zoo)
        addresses = ["127.0.0.1:9", worker.address, "127.0.0.1:9", "127.0.0.1:9"]
        slots = [WorkerSlot(f"w{i}", f"w{i}", a, 1.0) for i, a in enumerate(addresses)]
        plan, cut = plan_even(
            captured.graph, slots, job_id=JOB_ID, epoch=EPOCH, stages=2, start_step=0, replicas=2
        )
        stage = cut.stages[1]
        names = [p.name for p in stage.graph.params]
        tensors = [(n, captured.state[n]) for n in names]
        self.params = {n: t for n, t in tensors if t.is_floating_point()}
        self.assignment = stage_assignment_pb(
            StageHandover(
                job_id=JOB_ID,
                epoch=EPOCH,
                stage=stage,
                plan=plan,
                routes=stage_routes(cut)[1],
                spec=spec,
                fingerprint="",
                start_step=0,
                secret=secrets.token_hex(16),
                tensors=tensors,
                replica=0,
            )
        )
        parts = [worker_pb2.LoadStagePart(assignment=self.assignment)]
        parts += [worker_pb2.LoadStagePart(chunk=c) for c in iter_chunks([t for _, t in tensors])]
        worker.stub.LoadStage(
            iter(parts),
            metadata=coordinator_metadata(COORDINATOR_CREDENTIAL),
            timeout=CALL_TIMEOUT_S,
        )

    def share(
        self, tensors: list[tuple[str, torch.Tensor]] | None = None, **header: Any
    ) -> list[worker_pb2.ReplicaGradientsPart]:
        if tensors is None:
            name, p = next(iter(self.params.items()))
            tensors = [(name, torch.ones_like(p)), (LOSS, torch.ones(1, dtype=torch.float64))]
        fields: dict[str, Any] = {
            "job_id": JOB_ID,
            "epoch": EPOCH,
            "sync_secret": self.assignment.sync_secret,
            "step": 0,
            "stage": 1,
            "src_replica": 1,
        }
        fields.update(header)
        pb = worker_pb2.ReplicaGradientsHeader(
            tensors=[header_of(n, t) for n, t in tensors], **fields
        )
        chunks = iter_chunks([t for _, t in tensors])
        return [worker_pb2.ReplicaGradientsPart(header=pb)] + [
            worker_pb2.ReplicaGradientsPart(chunk=c) for c in chunks
        ]

    def send(self, parts: list[worker_pb2.ReplicaGradientsPart]) -> worker_pb2.Ack:
        return self.worker.stub.ReplicaGradients(
            iter(parts), metadata=token_metadata(TOKEN), timeout=CALL_TIMEOUT_S
        )

    def refused(
        self, parts: list[worker_pb2.ReplicaGradientsPart], code: grpc.StatusCode, match: str
    ) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            self.send(parts)
        err = caught.value
        assert err.code() == code, err.details()
        assert match in (err.details() or ""), err.details()


@pytest.fixture
def holder() -> Iterator[Holder]:
    worker = InProcessWorker()
    try:
        yield Holder(worker)
    finally:
        worker.close()


def test_a_replica_refuses_gradients_not_of_its_sync_group_and_accepts_a_good_share_once(
    holder: Holder,
) -> None:
    name, p = next(iter(holder.params.items()))
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    holder.refused(
        holder.share(sync_secret="x" * 32),
        grpc.StatusCode.PERMISSION_DENIED,
        "wrong sync-group secret",
    )
    holder.refused(holder.share(epoch=EPOCH + 1), grpc.StatusCode.FAILED_PRECONDITION, "no stage")
    holder.refused(holder.share(src_replica=0), invalid, "not in this stage's sync group")
    holder.refused(holder.share(stage=0), invalid, "no replica of stage 0")
    holder.refused(holder.share(step=7), invalid, "not due")
    holder.refused(holder.share([("nope", torch.ones(3))]), invalid, "not one gradient")
    wrong = torch.ones(p.numel() + 1)
    holder.refused(holder.share([(name, wrong)]), invalid, "expected")
    too_big = torch.ones(p.numel() * 64 + (1 << 20))
    holder.refused(holder.share([(name, too_big)]), invalid, "declares over")
    holder.send(holder.share())
    holder.refused(holder.share(), invalid, "arrived twice")
    assert holder.worker.status().job_id == JOB_ID
