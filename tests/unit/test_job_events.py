"""The event log and the checkpoints' validation loss, on a real (SQLite) store.

The validation loss the coordinator computes from a checkpoint is checked against plain
PyTorch: the same model trained a few steps in one process, then evaluated on the same
held-out batches, gives the same number when its state is handed over as a checkpoint is.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from coordinator.checkpoints import Checkpoints
from coordinator.events import CLUSTER, EventKind, EventLog
from coordinator.job_record import Job
from coordinator.planning.jobspec import JobSpec, JobSpecError, parse_job_spec
from coordinator.store import open_store
from coordinator.validation import CheckpointValidation, ValidationError, validation_loss
from opdag.capture import capture
from opdag.reference import ReferenceTrainer
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

SPEC = """
name: tiny
model: {zoo: gpt, args: {layers: 1, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}
optimizer: {name: adamw, lr: 0.003}
steps: 10
validation: {batches: 2}
"""


def test_events_are_recorded_in_order_and_read_after_a_seq(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            log = EventLog(store)
            await log.record("j1", EventKind.SUBMITTED, "submitted", steps=10)
            await log.record("j1", EventKind.PLANNED, "epoch 1", epoch=1)
            await log.record(CLUSTER, EventKind.JOINED, "worker w0 joined", worker_id="a")
            events = await log.since("j1")
            assert [(e["seq"], e["kind"], e["text"]) for e in events] == [
                (1, "submitted", "submitted"),
                (2, "planned", "epoch 1"),
            ]
            assert events[0]["steps"] == 10 and events[1]["epoch"] == 1
            assert all(isinstance(e["at"], float) for e in events)
            assert [e["seq"] for e in await log.since("j1", after_seq=1)] == [2]
            assert [e["kind"] for e in await log.latest("j1", limit=1)] == ["planned"]
            assert [e["worker_id"] for e in await log.since(CLUSTER)] == ["a"]

    asyncio.run(run())


def test_an_event_the_store_refuses_costs_only_the_event(tmp_path: Path) -> None:
    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            log = EventLog(store)
            await log.record("", EventKind.PLANNED, "no scope")  # refused, logged, not raised
            assert await log.since("") == []

    asyncio.run(run())


def _trained_reference(steps: int) -> tuple[ReferenceTrainer, float]:
    spec = parse_job_spec(SPEC)
    ref = ReferenceTrainer(
        model=spec.model.zoo,
        model_args=spec.model.args_dict(),
        data=spec.data,
        optimizer=spec.optimizer,
        seed=spec.seed,
    )
    for step in range(steps):
        ref.train_step(step)
    return ref, ref.evaluate(2)


def test_the_validation_loss_of_a_state_equals_plain_pytorch() -> None:
    spec = parse_job_spec(SPEC)
    ref, expected = _trained_reference(3)
    state = {k: v.detach().clone() for k, v in ref.model.state_dict().items()}
    assert validation_loss(spec, state, 2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # And a state three steps on is not the initial model's: the figure follows the weights.
    untrained = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed)
    initial = validation_loss(spec, untrained.state_dict(), 2)
    assert abs(initial - expected) > 1e-3


def test_a_checkpoint_without_a_tensor_of_the_model_is_refused() -> None:
    spec = parse_job_spec(SPEC)
    state = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed).state_dict()
    del state["tok_emb.weight"]
    with pytest.raises(ValidationError, match=r"tok_emb\.weight"):
        validation_loss(spec, state, 1)


def test_each_checkpoint_validated_becomes_an_event(tmp_path: Path) -> None:
    spec = parse_job_spec(SPEC)
    model = build_model(spec.model.zoo, spec.model.args_dict(), seed=spec.seed)
    example = example_batch(spec.model.zoo, spec.model.args_dict(), 2, device="meta")
    captured = capture(model, example, name=spec.model.zoo)

    async def run() -> None:
        with open_store(f"sqlite:///{tmp_path / 's.db'}") as store:
            log = EventLog(store)
            checking = CheckpointValidation(Checkpoints(store), log)
            job = Job(job_id="j1", name="tiny", spec=spec)
            ((at, loss),) = await checking.evaluate(job, captured, 0)  # the model's own state
            assert at == 0 and math.isfinite(loss)
            reference = validation_loss(spec, dict(captured.state), 2)
            assert loss == pytest.approx(reference, rel=1e-6)
            (event,) = await log.since("j1")
            assert event["kind"] == "validation" and event["step"] == 0
            assert event["loss"] == pytest.approx(loss) and event["batches"] == 2
            # Off for a job that asks for no validation batches.
            off_spec = JobSpec.from_dict({**spec.to_dict(), "validation": {"batches": 0}})
            off = Job(job_id="j2", name="off", spec=off_spec)
            assert await checking.evaluate(off, captured, 0) == []
            assert await log.since("j2") == []

    asyncio.run(run())


def test_validation_batches_are_bounded_in_the_spec() -> None:
    with pytest.raises(JobSpecError, match=r"validation\.batches"):
        parse_job_spec(SPEC.replace("{batches: 2}", "{batches: 65}"))
    assert parse_job_spec(SPEC.replace("{batches: 2}", "{batches: 0}")).validation.batches == 0
    # The default: one held-out batch per checkpoint.
    assert parse_job_spec(SPEC.replace("validation: {batches: 2}", "")).validation.batches == 1
