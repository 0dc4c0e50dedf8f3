"""The coordinator's side of bad values, on a real (SQLite) store: whom a report of refused
values gets quarantined (`coordinator.quarantine`), which losses are believed, which
checkpoint parts are taken in (`coordinator.checkpoint_upload`), and which checkpoints
pass validation and are kept (`coordinator.checkpoints`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from coordinator.checkpoint_upload import CheckpointValuesRefused, check_checkpoint_part
from coordinator.checkpoints import Checkpoints
from coordinator.events import EventLog
from coordinator.exclusions import Exclusions
from coordinator.job_record import Job, JobError, Progress, Suspect
from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import Placement, Plan
from coordinator.quarantine import ACCUSER_LIMIT, Quarantine
from coordinator.registry import Registry
from coordinator.store import StateStore, open_store
from opdag.capture import capture
from opdag.ir import CapturedModel, ParamSpec
from opdag.optim import OPTIM_PREFIX
from opdag.partition import balanced_assignment, partition
from opdag.zoo import build_model, example_batch

pytestmark = pytest.mark.unit

SPEC = """
name: tiny
model: {zoo: gpt, args: {layers: 1, d_model: 16, heads: 2, context: 8}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 2}
optimizer: {name: adamw, lr: 0.003}
steps: 10
"""


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with open_store(f"sqlite:///{tmp_path / 's.db'}") as s:
        yield s


def job_on(*pipelines: tuple[str, ...], job_id: str = "j1") -> Job:
    """A job whose plan runs replica r's stage s on worker pipelines[r][s]."""
    placements = tuple(
        Placement(s, w, w, f"127.0.0.1:{7000 + 10 * r + s}", 1, 1, 1.0, replica=r)
        for r, workers in enumerate(pipelines)
        for s, w in enumerate(workers)
    )
    plan = Plan(job_id, 1, "even", 0, {}, placements)
    job = Job(job_id=job_id, name="tiny", spec=parse_job_spec(SPEC), epoch=1)
    job.plan = plan
    return job


def report(worker: str, *suspects: Suspect, loss: float | None = None) -> Progress:
    return Progress(
        worker_id=worker,
        job_id="j1",
        epoch=1,
        stage=0,
        step=3,
        loss=loss,
        step_seconds=0.1,
        sent={},
        finished=False,
        drained=False,
        error="",
        suspects=suspects,
    )


def gradient_from(stage: int, replica: int = 0) -> Suspect:
    return Suspect("gradient", stage, replica, 5, f"gradient 'h' from stage {stage} is not finite")


def quarantine_of(store: StateStore) -> tuple[Quarantine, Exclusions]:
    registry = Registry(timeout_s=5.0)
    events = EventLog(store)
    registry.exclusions = Exclusions(store, events)
    return Quarantine(store, registry, events), registry.exclusions


def test_a_first_accusation_quarantines_the_sender_with_its_evidence(store: StateStore) -> None:
    async def run() -> None:
        q, exclusions = quarantine_of(store)
        job = job_on(("a", "h", "c"))
        (v,) = await q.hear(job, report("a", gradient_from(1)))
        assert v.quarantined and v.accused_id == "h" and v.weight == 1.0
        assert exclusions.excluded("h") and exclusions.get("h").until is None  # type: ignore[union-attr]
        assert v.text.startswith("quarantined worker h: gradient 'h' from stage 1 is not finite")
        assert "(reported by a)" in v.text
        events = await EventLog(store).since("j1")
        assert events[-1]["kind"] == "quarantined" and events[-1]["accuser_id"] == "a"
        assert not exclusions.excluded("a")

    asyncio.run(run())


def test_a_report_about_a_worker_that_sends_the_accuser_nothing_is_not_heard(
    store: StateStore,
) -> None:
    async def run() -> None:
        q, exclusions = quarantine_of(store)
        job = job_on(("a", "b"), ("c", "d"))
        # a (replica 0, stage 0) blames stage 1 of replica 1: no transfer between them.
        assert await q.hear(job, report("a", gradient_from(1, replica=1))) == []
        # A share comes only from the same stage of another replica; a worker not in the
        # plan is heard by nobody; nor is a worker blaming itself.
        assert await q.hear(job, report("a", Suspect("share", 1, 1, 5, "x"))) == []
        assert await q.hear(job, report("zz", gradient_from(1))) == []
        assert await q.hear(job, report("a", gradient_from(0))) == []
        assert exclusions.rows() == []
        (v,) = await q.hear(job, report("a", Suspect("share", 0, 1, 5, "outlier")))
        assert v.accused_id == "c" and v.quarantined

    asyncio.run(run())


def test_an_accusers_weight_falls_with_each_worker_it_names(store: StateStore) -> None:
    async def run() -> None:
        q, exclusions = quarantine_of(store)
        first = await q.hear(job_on(("a", "b1")), report("a", gradient_from(1)))
        second = await q.hear(job_on(("a", "b2")), report("a", gradient_from(1)))
        assert first[0].quarantined and exclusions.get("b1").until is None  # type: ignore[union-attr]
        # The second worker a names weighs a half: backed off, not quarantined...
        assert second[0].weight == 0.5 and not second[0].quarantined
        b2 = exclusions.get("b2")
        assert b2 is not None and b2.until is not None
        # ...until another accuser names it too.
        (third,) = await q.hear(job_on(("c", "b2")), report("c", gradient_from(1)))
        assert third.quarantined and third.score == 1.5
        for i in range(3, ACCUSER_LIMIT + 1):
            await q.hear(job_on(("a", f"b{i}")), report("a", gradient_from(1)))
        # The accuser that named ACCUSER_LIMIT workers is the common factor.
        a = exclusions.get("a")
        assert a is not None and a.until is None and "common factor" in a.reason

    asyncio.run(run())


def test_two_replicas_naming_the_same_outlier_quarantine_it(store: StateStore) -> None:
    async def run() -> None:
        q, exclusions = quarantine_of(store)
        job = job_on(("x",), ("y",), ("h",))
        (v1,) = await q.hear(job, report("x", Suspect("share", 0, 2, 4, "cosine -0.7")))
        assert v1.weight == 1.0
        (v2,) = await q.hear(job, report("y", Suspect("share", 0, 2, 4, "cosine -0.7")))
        assert v2.quarantined and v2.score == 2.0 and exclusions.excluded("h")

    asyncio.run(run())


def test_accusations_survive_a_restarted_coordinator(store: StateStore) -> None:
    async def run() -> None:
        q, _ = quarantine_of(store)
        await q.hear(job_on(("a", "b1")), report("a", gradient_from(1)))
        again, _ = quarantine_of(store)  # a new coordinator on the same store
        (v,) = await again.hear(job_on(("a", "b2")), report("a", gradient_from(1)))
        assert v.weight == 0.5 and not v.quarantined

    asyncio.run(run())


def test_losses_that_are_not_finite_or_jump_are_not_believed(store: StateStore) -> None:
    q, _ = quarantine_of(store)
    job = job_on(("a", "b"))
    assert q.loss_problem(job, report("b", loss=None)) == ""
    assert "reported a loss of nan" in q.loss_problem(job, report("b", loss=math.nan))
    assert "loss of inf" in q.loss_problem(job, report("b", loss=math.inf))
    assert "loss of 1e+13" in q.loss_problem(job, report("b", loss=1e13))
    for loss in (4.0, 3.9, 3.8, 3.7, 3.6):  # the warm-up: believed
        assert q.loss_problem(job, report("b", loss=loss)) == ""
    assert q.loss_problem(job, report("b", loss=300.0)) == ""  # under 100 x 3.8
    assert "over 100 x its typical 3.8" in q.loss_problem(job, report("b", loss=400.0))
    # A loss trained down near zero may move by more than 100x, never past its start.
    mse = job_on(("a", "b"), job_id="j2")
    for loss in (1.0, 0.9, 0.8, 0.7, 0.6, *[1e-6] * 40):
        assert q.loss_problem(mse, report("b", loss=loss)) == ""
    assert q.loss_problem(mse, report("b", loss=1e-3)) == ""
    assert "over 100 x its typical 0.8" in q.loss_problem(mse, report("b", loss=81.0))


def test_a_bad_loss_backs_its_reporter_off(store: StateStore) -> None:
    async def run() -> None:
        q, exclusions = quarantine_of(store)
        job = job_on(("a", "b"))
        text = await q.own_values(job, "b", "stage 1 reported a loss of nan", for_good=False)
        assert text == "excluded worker b for a while: stage 1 reported a loss of nan"
        e = exclusions.get("b")
        assert e is not None and e.until is not None
        events = await EventLog(store).since("j1")
        assert events[-1]["kind"] == "bad_loss"

    asyncio.run(run())


# -- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> CapturedModel:
    spec = parse_job_spec(SPEC)
    args = spec.model.args_dict()
    built = build_model(spec.model.zoo, args, seed=spec.seed)
    return capture(built, example_batch(spec.model.zoo, args, 2, device="meta"), name="gpt")


def stage_state(
    model: CapturedModel, names: set[str], optimizer: bool = True
) -> dict[str, torch.Tensor]:
    out = {n: t.clone() for n, t in model.state.items() if n in names}
    if optimizer:
        for p in model.graph.params:
            if p.name in names and p.trainable:
                out[f"{OPTIM_PREFIX}{p.name}/exp_avg"] = torch.zeros(p.shape)
                out[f"{OPTIM_PREFIX}{p.name}/step"] = torch.tensor(3.0, dtype=torch.float64)
    return out


def two_stages(model: CapturedModel) -> list[dict[str, ParamSpec]]:
    cut = partition(model.graph, balanced_assignment(model.graph, 2))
    return [{p.name: p for p in s.graph.params} for s in cut.stages]


def test_a_checkpoint_part_is_taken_only_whole_shaped_and_finite(model: CapturedModel) -> None:
    stages = two_stages(model)
    names = set(stages[0])
    good = stage_state(model, names)
    check_checkpoint_part(model, stages[0], good, "part")
    check_checkpoint_part(model, None, good, "part")
    with pytest.raises(JobError, match="lacks"):
        check_checkpoint_part(model, stages[0], {}, "part")
    other = next(iter(stages[1]))
    with pytest.raises(JobError, match="not one of the stage's"):
        check_checkpoint_part(model, stages[0], {**good, other: model.state[other]}, "part")
    shape = {n: model.state[n].shape for n in names}
    first = sorted(n for n in names if len(shape[n]) == 2 and shape[n][0] != shape[n][1])[0]
    with pytest.raises(JobError, match="the model's is"):
        check_checkpoint_part(model, stages[0], {**good, first: good[first].T.contiguous()}, "part")
    with pytest.raises(JobError, match="neither"):
        check_checkpoint_part(
            model, stages[0], {**good, f"{OPTIM_PREFIX}{first}/exp_avg": torch.zeros(2, 3)}, "p"
        )
    odd = {k: v for k, v in good.items() if not k.endswith(f"{first}/step")}
    with pytest.raises(JobError, match="different kinds of optimizer state"):
        check_checkpoint_part(model, stages[0], odd, "part")
    for bad in (math.nan, math.inf, 1e31):
        poisoned = {k: v.clone() for k, v in good.items()}
        poisoned[first].view(-1)[0] = bad
        with pytest.raises(CheckpointValuesRefused, match=repr(first)):
            check_checkpoint_part(model, stages[0], poisoned, "part")


def test_recovery_goes_back_to_the_newest_validated_checkpoint(
    store: StateStore, model: CapturedModel
) -> None:
    async def run() -> None:
        cps = Checkpoints(store)
        stages = two_stages(model)

        async def save(step: int, *, lacking: str = "") -> None:
            for i, names in enumerate(stages):
                state = stage_state(model, set(names) - {lacking})
                await cps.accept("j1", model, stage=i, num_stages=2, step=step, tensors=state)

        assert await cps.latest("j1") == 0
        await save(2)
        await save(4)
        assert await cps.latest("j1") == 4 and await cps.validated("j1", 4)
        await cps.unvalidate("j1", 4, "held-out loss nan")
        assert await cps.latest("j1") == 2
        # Never pruned: the newest validated one stays whatever comes after it.
        lacking = next(iter(stages[1]))
        for step in (6, 8, 10):
            await save(step, lacking=lacking)  # complete, but lacking a tensor: not valid
            await cps.prune("j1")
        assert await cps.latest("j1") == 2
        assert store.checkpoint_parts("j1", 2)
        assert store.latest_checkpoint("j1") == 10
        # A new coordinator reads the marks back.
        assert await Checkpoints(store).latest("j1") == 2
        # A re-plan from step 2 drops what came after it, marks included.
        await cps.discard_after("j1", 2)
        await save(4)
        assert await Checkpoints(store).latest("j1") == 4

    asyncio.run(run())


def test_a_job_stored_before_the_marks_resumes_from_its_newest_checkpoint(
    store: StateStore, model: CapturedModel
) -> None:
    from opdag import model_file

    blob = model_file.encode_state(dict(model.state))
    store.put_checkpoint_part("j1", 6, 0, 1, blob)
    assert asyncio.run(Checkpoints(store).latest("j1")) == 6
