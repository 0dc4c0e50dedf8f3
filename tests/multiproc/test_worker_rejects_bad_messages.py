"""A real worker gRPC server, holding a real stage, refuses every malformed peer transfer
and stage hand-over with a status that names the problem, changes nothing, and keeps
serving: the same (step, micro-batch) is accepted afterwards from a correct sender.

The server runs in this process (its own event loop on a thread) so the test can look at
the process's memory while a sender declares a huge tensor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch

from compressors import Payload, TopK
from coordinator.handover import StageHandover
from coordinator.planning.jobspec import JobSpec, parse_job_spec
from coordinator.planning.plan import WorkerSlot, plan_even, stage_routes
from coordinator.serde import stage_assignment_pb
from opdag.capture import capture
from opdag.ir import dtype_of
from opdag.zoo import build_model, example_batch
from proto import worker_pb2, worker_pb2_grpc
from proto.rpc import CHANNEL_OPTIONS, SERVER_OPTIONS, coordinator_metadata, token_metadata
from proto.tensor_stream import encode_values, header_of, iter_chunks
from worker.edge_compression import compressed_tensor
from worker.node import WorkerNode
from worker.serde import StagePlan
from worker.service import WorkerService
from worker.stage_job import StepReport
from worker.transfer_kind import TransferKind

pytestmark = pytest.mark.multiproc
T = TypeVar("T")

TOKEN = "in-process-worker-token"
# What the coordinator would give the worker when it registers (the test calls as it).
COORDINATOR_CREDENTIAL = "in-process-coordinator-credential"
JOB_ID = "job-under-test"
EPOCH = 3
STEPS = 1000
# Plenty of (step, micro-batch) slots: every test takes fresh ones.
SPEC = f"""
name: rejects
model: {{zoo: gpt, args: {{layers: 1, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
parallel: {{stages: 2}}
checkpoint: {{every: 100}}
"""
CALL_TIMEOUT_S = 30


# -- the stage the coordinator would hand out ----------------------------------------------


@dataclass(frozen=True)
class StageHandOut:
    """What the coordinator streams to a worker for one stage, built the coordinator's way."""

    spec: JobSpec
    assignment: worker_pb2.StageAssignment
    tensors: tuple[torch.Tensor, ...]

    def parts(self) -> Iterator[worker_pb2.LoadStagePart]:
        yield worker_pb2.LoadStagePart(assignment=self.assignment)
        for chunk in iter_chunks(self.tensors):
            yield worker_pb2.LoadStagePart(chunk=chunk)


def build_stage_hand_out(
    *, spec_yaml: str, job_id: str, epoch: int, stage: int, addresses: Sequence[str]
) -> StageHandOut:
    """Capture the spec's model, plan it evenly over workers at `addresses` and build the
    assignment and tensors of `stage` (as `coordinator.jobs` does)."""
    spec = parse_job_spec(spec_yaml)
    args = spec.model.args_dict()
    model = build_model(spec.model.zoo, args, seed=spec.seed)
    example = example_batch(spec.model.zoo, args, spec.data.micro_batch_size, device="meta")
    captured = capture(model, example, name=spec.model.zoo)
    slots = [WorkerSlot(f"w{i}", f"w{i}", a, 1.0) for i, a in enumerate(addresses)]
    plan, cut = plan_even(
        captured.graph, slots, job_id=job_id, epoch=epoch, stages=len(slots), start_step=0
    )
    names = [p.name for p in cut.stages[stage].graph.params]
    tensors = tuple(captured.state[n] for n in names)
    assignment = stage_assignment_pb(
        StageHandover(
            job_id=job_id,
            epoch=epoch,
            stage=cut.stages[stage],
            plan=plan,
            routes=stage_routes(cut)[stage],
            spec=spec,
            fingerprint="",
            start_step=0,
            secret=secrets.token_hex(16),
            tensors=list(zip(names, tensors, strict=True)),
        )
    )
    return StageHandOut(spec, assignment, tensors)


# -- an in-process worker server -----------------------------------------------------------


@dataclass
class RecordingReporter:
    """A stand-in for the coordinator link: remembers what the stage reports."""

    reports: list[StepReport] = field(default_factory=list)
    checkpoints: list[tuple[str, int]] = field(default_factory=list)

    def progress(self, report: StepReport) -> None:
        self.reports.append(report)

    async def checkpoint(
        self, plan: StagePlan, steps_done: int, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        self.checkpoints.append((plan.job_id, steps_done))


class InProcessWorker:
    """`WorkerService(WorkerNode(...))` served on 127.0.0.1 from an event loop thread."""

    def __init__(self) -> None:
        self.reporter = RecordingReporter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self._run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(self) -> int:
        self.node = WorkerNode(token=TOKEN, tls=None, reporter=self.reporter)
        self.node.credentials.admit("w-in-process", "in-process-credential", COORDINATOR_CREDENTIAL)
        self.server = grpc.aio.server(options=SERVER_OPTIONS)
        worker_pb2_grpc.add_WorkerServicer_to_server(
            WorkerService(self.node, worker_id=lambda: "w-in-process", name="in-process"),
            self.server,
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    async def _stop(self) -> None:
        await self.node.close()
        await self.server.stop(grace=1)

    def close(self) -> None:
        self.channel.close()
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def status(self) -> worker_pb2.WorkerStatus:
        return self.stub.Status(
            worker_pb2.StatusRequest(),
            metadata=coordinator_metadata(COORDINATOR_CREDENTIAL),
            timeout=CALL_TIMEOUT_S,
        )


# -- transfers -------------------------------------------------------------------------------


@dataclass
class Transfer:
    """One Activations/Gradients call: a header, then the tensors' bytes in chunks."""

    header: worker_pb2.TransferHeader
    chunks: list[bytes]

    def parts(self) -> list[worker_pb2.TransferPart]:
        return [worker_pb2.TransferPart(header=self.header)] + [
            worker_pb2.TransferPart(chunk=c) for c in self.chunks
        ]


@dataclass
class LoadedStage:
    """The in-process worker holding stage 1 of a two-stage job, and what a correct stage-0
    peer would send it."""

    worker: InProcessWorker
    hand_out: StageHandOut
    slots: Iterator[tuple[int, int]]

    @property
    def secret(self) -> str:
        return next(ps.secret for ps in self.hand_out.assignment.pair_secrets if ps.stage == 0)

    def correct_values(self) -> dict[str, torch.Tensor]:
        """A value of the graph's dtype and shape for everything stage 0 sends stage 1."""
        a = self.hand_out.assignment
        names = [r.name for r in a.receives]
        names += [n for n in a.graph.inputs if n not in names]  # data inputs, via stage 0
        metas = {n.name: n.meta for n in a.graph.nodes}
        gen = torch.Generator().manual_seed(0)
        values = {}
        for name in names:
            meta = metas[name]
            dtype = dtype_of(meta.dtype)
            if dtype.is_floating_point:
                values[name] = torch.randn(tuple(meta.shape), generator=gen, dtype=dtype)
            else:
                values[name] = torch.randint(0, 50, tuple(meta.shape), generator=gen, dtype=dtype)
        return values

    def transfer(
        self,
        slot: tuple[int, int],
        values: Mapping[str, torch.Tensor] | None = None,
        **header: Any,
    ) -> Transfer:
        named, tensors = encode_values(self.correct_values() if values is None else values)
        fields: dict[str, Any] = {
            "job_id": JOB_ID,
            "epoch": EPOCH,
            "pair_secret": self.secret,
            "step": slot[0],
            "micro_batch": slot[1],
            "src_stage": 0,
        }
        fields.update(header)
        pb = worker_pb2.TransferHeader(
            values=named, tensors=[header_of(n, t) for n, t in tensors], **fields
        )
        return Transfer(pb, list(iter_chunks([t for _, t in tensors])))

    def send(
        self, parts: Sequence[worker_pb2.TransferPart], *, kind: str = "Activations"
    ) -> worker_pb2.Ack:
        return getattr(self.worker.stub, kind)(
            iter(parts), metadata=token_metadata(TOKEN), timeout=CALL_TIMEOUT_S
        )

    def assert_refused(
        self,
        parts: Sequence[worker_pb2.TransferPart],
        code: grpc.StatusCode,
        match: str,
        *,
        kind: str = "Activations",
        then_accepts: tuple[int, int] | None = None,
    ) -> None:
        """The call fails with `code` and details containing `match`; the worker still holds
        its stage and accepts a correct transfer (for the same slot, when given: the refused
        one took nothing)."""
        with pytest.raises(grpc.RpcError) as refused:
            self.send(parts, kind=kind)
        assert refused.value.code() == code, refused.value.details()
        assert match in (refused.value.details() or ""), refused.value.details()
        self.assert_still_serving(then_accepts or next(self.slots))

    def assert_still_serving(self, slot: tuple[int, int]) -> None:
        status = self.worker.status()
        assert (status.job_id, status.epoch, status.stage, status.state) == (
            JOB_ID,
            EPOCH,
            1,
            "loaded",
        )
        assert isinstance(self.send(self.transfer(slot).parts()), worker_pb2.Ack)
        self.take(slot)

    def take(self, slot: tuple[int, int]) -> None:
        """Take a delivered slot out of the stage's inbox, as its schedule would (the stage
        never runs, and its inbox keeps only a window of two steps)."""
        job = self.worker.node.job
        assert job is not None
        self.worker._run(job.inbox.take(TransferKind.FORWARD, slot[0], slot[1], {0}))


@pytest.fixture(scope="module")
def loaded() -> Iterator[LoadedStage]:
    worker = InProcessWorker()
    try:
        hand_out = build_stage_hand_out(
            spec_yaml=SPEC,
            job_id=JOB_ID,
            epoch=EPOCH,
            stage=1,
            addresses=["127.0.0.1:9", worker.address],
        )
        reply = worker.stub.LoadStage(
            hand_out.parts(),
            metadata=coordinator_metadata(COORDINATOR_CREDENTIAL),
            timeout=CALL_TIMEOUT_S,
        )
        assert (reply.job_id, reply.epoch, reply.stage) == (JOB_ID, EPOCH, 1)
        # The stage stays at step 0: its inbox takes steps 0 and 1 only (each slot is taken
        # out again once delivered, so the slots come round).
        slots = itertools.cycle(
            itertools.product(range(2), range(hand_out.spec.data.micro_batches))
        )
        yield LoadedStage(worker, hand_out, slots)
    finally:
        worker.close()


def _vm_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field_name}")


# -- the tests -----------------------------------------------------------------------------


def test_worker_accepts_a_correct_transfer_for_its_loaded_stage(loaded: LoadedStage) -> None:
    loaded.assert_still_serving(next(loaded.slots))
    assert loaded.worker.status().name == "in-process"
    assert loaded.worker.reporter.reports == []  # loaded, never started: nothing to report


def test_worker_rejects_header_whose_nbytes_disagree_with_shape_and_dtype(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    t.header.tensors[1].nbytes += 4
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "the header says", then_accepts=slot
    )


def test_worker_rejects_stream_with_more_bytes_than_declared(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    t.chunks.append(b"\0" * 8)
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "brings more than", then_accepts=slot
    )


def test_worker_rejects_stream_with_fewer_bytes_than_declared(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    t.chunks[-1] = t.chunks[-1][:-8]
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "ended after", then_accepts=slot
    )


def test_worker_rejects_value_whose_dtype_differs_from_the_stage_graph(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    values = loaded.correct_values()
    name = next(n for n, v in values.items() if v.dtype == torch.float32)
    values[name] = values[name].to(torch.int32)  # same byte count: only the dtype is wrong
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"value {name!r}: expected float32",
        then_accepts=slot,
    )


def test_worker_rejects_value_whose_shape_differs_from_the_stage_graph(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    values = loaded.correct_values()
    name = next(n for n, v in values.items() if v.dim() == 3)
    values[name] = values[name].transpose(1, 2).contiguous()  # same bytes, wrong shape
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"value {name!r}: expected float32{list(loaded.correct_values()[name].shape)}",
        then_accepts=slot,
    )


def test_worker_rejects_value_name_the_stage_does_not_receive(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    values = loaded.correct_values()
    name = next(iter(values))
    values["no_such_value"] = values.pop(name)
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "'no_such_value'",
        then_accepts=slot,
    )


def test_worker_rejects_transfer_missing_a_value(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    values = loaded.correct_values()
    missing = sorted(values)[-1]
    del values[missing]
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"expected {sorted(loaded.correct_values())}",
        then_accepts=slot,
    )


def test_worker_rejects_value_referring_to_a_tensor_not_in_the_stream(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    t.header.values[0].value.tensor = len(t.header.tensors)
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "not in the stream", then_accepts=slot
    )


def test_worker_rejects_tensor_used_by_two_values(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    t.header.values[1].value.tensor = t.header.values[0].value.tensor
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "used twice", then_accepts=slot
    )


def test_worker_rejects_transfer_with_a_wrong_pair_secret(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot, pair_secret=secrets.token_hex(16))
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.PERMISSION_DENIED, "wrong stage-pair secret", then_accepts=slot
    )


def test_worker_rejects_transfer_for_another_epoch(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot, epoch=EPOCH + 1)
    loaded.assert_refused(
        t.parts(),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"epoch {EPOCH + 1}",
        then_accepts=slot,
    )


def test_worker_rejects_transfer_for_an_unknown_job(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot, job_id="some-other-job")
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.FAILED_PRECONDITION, "some-other-job", then_accepts=slot
    )


def test_worker_refusal_quoting_an_overlong_job_id_still_reaches_the_sender(
    loaded: LoadedStage,
) -> None:
    # The refusal names the job; cut short, it still fits gRPC's 16 KiB trailer.
    t = loaded.transfer(next(loaded.slots), job_id="é" * 70_000)
    loaded.assert_refused(t.parts(), grpc.StatusCode.FAILED_PRECONDITION, "no stage of job ééé")


def test_worker_rejects_step_outside_the_job(loaded: LoadedStage) -> None:
    t = loaded.transfer((STEPS, 0))
    loaded.assert_refused(t.parts(), grpc.StatusCode.INVALID_ARGUMENT, f"step {STEPS} is not")


def test_worker_rejects_micro_batch_out_of_range(loaded: LoadedStage) -> None:
    micro_batches = loaded.hand_out.spec.data.micro_batches
    t = loaded.transfer((STEPS - 1, micro_batches))
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, f"micro-batch {micro_batches} is out"
    )


def test_worker_rejects_the_same_micro_batch_delivered_twice(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    loaded.send(loaded.transfer(slot).parts())
    loaded.assert_refused(
        loaded.transfer(slot).parts(), grpc.StatusCode.INVALID_ARGUMENT, "arrived twice"
    )
    loaded.take(slot)


def test_worker_rejects_a_step_beyond_its_in_flight_window(loaded: LoadedStage) -> None:
    # The stage is at step 0: a peer may be one step ahead at most, never further.
    t = loaded.transfer((2, 0))
    loaded.assert_refused(
        t.parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "values of step 2 from stage 0 arrived while this stage runs step 0: it keeps "
        "messages for steps 0 to 1 only",
    )


def test_worker_refuses_a_huge_declared_tensor_without_allocating_it(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    huge = 10 << 30
    name = t.header.tensors[0].name
    del t.header.tensors[0].shape[:]
    t.header.tensors[0].dtype = "uint8"
    t.header.tensors[0].shape.append(huge)
    t.header.tensors[0].nbytes = huge
    rss_before, peak_before = _vm_kib("VmRSS"), _vm_kib("VmPeak")
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "declares over", then_accepts=slot
    )
    # Neither touched (RSS) nor merely reserved (peak virtual size): a 10 GiB buffer would
    # show in both.
    assert _vm_kib("VmRSS") - rss_before < 256 << 10, f"tensor {name!r} grew the RSS"
    assert _vm_kib("VmPeak") - peak_before < 1 << 20, f"tensor {name!r} was reserved"


def test_worker_rejects_zero_size_tensor_whose_shape_overflows(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    t = loaded.transfer(slot)
    h = t.header.tensors[0]
    del h.shape[:]
    h.shape.extend([0, 1 << 40, 1 << 40])  # no elements, but strides beyond int64
    h.nbytes = 0
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "invalid shape", then_accepts=slot
    )


def test_worker_rejects_stream_that_starts_with_a_chunk(loaded: LoadedStage) -> None:
    t = loaded.transfer(next(loaded.slots))
    parts = t.parts()
    loaded.assert_refused(
        [parts[1], parts[0], *parts[2:]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "must start with its header",
    )


def test_worker_rejects_a_second_header_after_the_first(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    parts = loaded.transfer(slot).parts()
    loaded.assert_refused(
        [*parts, parts[0]],
        grpc.StatusCode.INVALID_ARGUMENT,
        "only chunks may follow",
        then_accepts=slot,
    )


def test_worker_rejects_an_empty_stream(loaded: LoadedStage) -> None:
    loaded.assert_refused([], grpc.StatusCode.INVALID_ARGUMENT, "empty stream")


def test_worker_rejects_gradients_from_a_stage_that_sends_none_here(
    loaded: LoadedStage,
) -> None:
    # Stage 1 is the last stage: nothing reads its values, so no gradients come back to it.
    t = loaded.transfer(next(loaded.slots), values={})
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "sends no gradients", kind="Gradients"
    )


def test_worker_rejects_calls_without_the_token(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    with pytest.raises(grpc.RpcError) as refused:
        loaded.worker.stub.Activations(iter(loaded.transfer(slot).parts()), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as refused:
        loaded.worker.stub.Status(
            worker_pb2.StatusRequest(), metadata=token_metadata("wrong-token"), timeout=30
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    loaded.assert_still_serving(slot)


def _load_stage(loaded: LoadedStage, parts: Sequence[worker_pb2.LoadStagePart]) -> None:
    loaded.worker.stub.LoadStage(
        iter(parts), metadata=coordinator_metadata(COORDINATOR_CREDENTIAL), timeout=30
    )


def test_worker_refuses_a_stage_naming_an_operator_outside_the_allow_list(
    loaded: LoadedStage,
) -> None:
    assignment = worker_pb2.StageAssignment()
    assignment.CopyFrom(loaded.hand_out.assignment)
    assignment.job_id = "job-with-eval"
    node = next(n for n in assignment.graph.nodes if n.op == "function")
    node.target = "builtins.eval"
    parts = list(loaded.hand_out.parts())
    parts[0] = worker_pb2.LoadStagePart(assignment=assignment)
    with pytest.raises(grpc.RpcError) as refused:
        _load_stage(loaded, parts)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'builtins.eval' is not in the allow-list" in (refused.value.details() or "")
    loaded.assert_still_serving(next(loaded.slots))


def test_worker_refuses_a_stage_whose_tensor_bytes_are_truncated(loaded: LoadedStage) -> None:
    assignment = worker_pb2.StageAssignment()
    assignment.CopyFrom(loaded.hand_out.assignment)
    assignment.job_id = "job-with-short-tensors"
    parts = list(loaded.hand_out.parts())
    parts[0] = worker_pb2.LoadStagePart(assignment=assignment)
    parts[-1] = worker_pb2.LoadStagePart(chunk=parts[-1].chunk[:-100])
    with pytest.raises(grpc.RpcError) as refused:
        _load_stage(loaded, parts)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended after" in (refused.value.details() or "")
    loaded.assert_still_serving(next(loaded.slots))


def test_worker_refuses_a_stage_whose_tensors_do_not_fit_its_graph(loaded: LoadedStage) -> None:
    hand_out = loaded.hand_out
    tensors = list(hand_out.tensors)
    tensors[0] = tensors[0].view(torch.int32)  # same bytes, not the graph's dtype
    assignment = worker_pb2.StageAssignment()
    assignment.CopyFrom(hand_out.assignment)
    assignment.job_id = "job-with-int-weights"
    del assignment.tensors[:]
    assignment.tensors.extend(
        header_of(h.name, t) for h, t in zip(hand_out.assignment.tensors, tensors, strict=True)
    )
    parts = [worker_pb2.LoadStagePart(assignment=assignment)]
    parts += [worker_pb2.LoadStagePart(chunk=c) for c in iter_chunks(tensors)]
    with pytest.raises(grpc.RpcError) as refused:
        _load_stage(loaded, parts)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = hand_out.assignment.tensors[0].name
    assert f"tensor {name!r}: expected float32" in (refused.value.details() or "")
    assert loaded.worker.status().job_id != "job-with-int-weights"
    # This refusal comes from building the stage, after the worker let go of the stage it
    # held (it takes a new stage only when the coordinator thinks it free); hand it back.
    _load_stage(loaded, list(hand_out.parts()))
    loaded.assert_still_serving(next(loaded.slots))


# -- compressed activations ----------------------------------------------------------------


def _compressed(loaded: LoadedStage, **topk: Any) -> tuple[dict[str, Any], str, Payload]:
    """The correct values with the first float activation as a top-k payload."""
    values: dict[str, Any] = dict(loaded.correct_values())
    name = next(n for n, v in values.items() if v.dtype == torch.float32)
    payload = TopK(**{"ratio": 0.1, **topk}).compress(values[name])
    values[name] = compressed_tensor(payload)
    return values, name, payload


def test_worker_accepts_a_compressed_activation(loaded: LoadedStage) -> None:
    values, _, _ = _compressed(loaded)
    assert isinstance(
        loaded.send(loaded.transfer(next(loaded.slots), values).parts()), worker_pb2.Ack
    )


def test_worker_rejects_a_compressed_activation_with_an_index_out_of_range(
    loaded: LoadedStage,
) -> None:
    slot = next(loaded.slots)
    values, name, payload = _compressed(loaded, indices="int32")
    numel = payload.numel
    indices = payload.indices[:-4] + numel.to_bytes(4, "little")  # one past the last entry
    values[name] = compressed_tensor(dataclasses.replace(payload, indices=indices))
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"value {name!r}: index {numel} out of range for {numel} elements",
        then_accepts=slot,
    )


def test_worker_rejects_a_compressed_layout_that_does_not_add_up(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    values, _, _ = _compressed(loaded)
    t = loaded.transfer(slot, values)
    compressed = next(h for h in t.header.tensors if h.encoding == "compressed")
    compressed.compressed.indices_bytes += 1
    loaded.assert_refused(
        t.parts(), grpc.StatusCode.INVALID_ARGUMENT, "must account for", then_accepts=slot
    )


def test_worker_rejects_a_forward_value_without_its_positions(loaded: LoadedStage) -> None:
    slot = next(loaded.slots)
    values, name, payload = _compressed(loaded)
    values[name] = compressed_tensor(payload, "mask")
    loaded.assert_refused(
        loaded.transfer(slot, values).parts(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must carry positions",
        then_accepts=slot,
    )
