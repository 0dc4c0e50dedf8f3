"""The service end to end: a real coordinator and real worker processes on loopback, jobs
submitted with the `archipelago` client, losses checked against plain PyTorch."""

from __future__ import annotations

import functools
import json
import math
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag.reference import ReferenceTrainer
from tests.multiproc.cluster import OPERATOR_TOKEN, Cluster, Proc, wait_for

pytestmark = pytest.mark.multiproc

SPEC = """
name: e2e
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {steps}
parallel: {{stages: {stages}}}
checkpoint: {{every: {every}}}
"""


@functools.cache
def reference_run(steps: int) -> tuple[list[float], float]:
    """Plain PyTorch: each step's loss, and the held-out loss after the last step."""
    spec = parse_job_spec(SPEC.format(steps=steps, stages=1, every=steps))
    trainer = ReferenceTrainer(
        model=spec.model.zoo,
        model_args=spec.model.args_dict(),
        data=spec.data,
        optimizer=spec.optimizer,
        seed=spec.seed,
    )
    losses = [trainer.train_step(step) for step in range(steps)]
    return losses, trainer.evaluate(spec.validation.batches)


def reference_losses(steps: int) -> list[float]:
    return reference_run(steps)[0]


def assert_losses_match_reference(cluster: Cluster, job_id: str, steps: int) -> None:
    job = cluster.job(job_id, with_metrics=True)
    losses = {m.step: m.loss for m in job.metrics}
    assert sorted(losses) == list(range(steps)), "a step has no loss"
    reference = reference_losses(steps)
    for step in range(steps):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


@pytest.fixture(scope="module")
def three_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator and workers w0..w2, shared by the tests at the end of this module
    that stop no process: each runs its own jobs (read by their ids) or none."""
    c = Cluster(tmp_path_factory.mktemp("service") / "cluster")
    try:
        c.start_coordinator()
        for i in range(3):
            c.start_worker(f"w{i}")
        yield c
    finally:
        c.close()


def alive_workers(cluster: Cluster) -> dict[str, Proc]:
    """The cluster's worker processes still running, by name."""
    return {p.name: p for p in cluster.procs if p is not cluster.coordinator and p.alive}


class TestWorkersLeavingAJob:
    """A worker killed, then one stopped with Ctrl-C, each mid-job, on one cluster
    (coordinator, w0..w3): the second job is planned on the three the first left alive."""

    @pytest.fixture(scope="class")
    @classmethod
    def cluster(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
        c = Cluster(tmp_path_factory.mktemp("leaving") / "cluster")
        try:
            c.start_coordinator()
            for name in ("w0", "w1", "w2", "w3"):
                c.start_worker(name)
            yield c
        finally:
            c.close()

    def test_killed_worker_is_replaced_and_training_resumes_from_checkpoint(
        self, cluster: Cluster
    ) -> None:
        # Four workers for a job of exactly 3 stages: whichever the planner leaves out is spare.
        workers = alive_workers(cluster)
        assert sorted(workers) == ["w0", "w1", "w2", "w3"]
        steps = 60
        job_id = cluster.submit(SPEC.format(steps=steps, stages=3, every=10))
        running = cluster.wait_job(
            job_id, lambda j: j.state == "running" and j.steps_done >= 15, "the job to pass step 15"
        )
        (spare,) = set(workers) - {s.worker_name for s in running.stages}
        victim = running.stages[1].worker_name
        cluster.kill(workers[victim])
        job = cluster.wait_job(
            job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
        )
        assert job.epoch >= 2 and job.recoveries >= 1
        assert victim not in {s.worker_name for s in job.stages}
        assert spare in {s.worker_name for s in job.stages}
        assert workers[spare].alive
        # The resumed run continues the curve: every step, before and after the kill, has the
        # loss one uninterrupted process gets.
        assert_losses_match_reference(cluster, job_id, steps)
        epochs = {m.step: m.epoch for m in cluster.job(job_id, with_metrics=True).metrics}
        assert epochs[steps - 1] == job.epoch and epochs[0] == 1
        # The job's timeline tells the story in order: planned, the worker lost, re-planned and
        # why, planned again and resumed from a checkpoint, completed.
        events = cluster.client().events(job_id)
        kinds = [e.kind for e in events]
        # (The last checkpoint's validation may come after the end.)
        assert kinds[:2] == ["submitted", "planned"]
        assert [k for k in kinds if k != "validation"][-1] == "completed"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        lost = kinds.index("worker_lost")
        assert events[lost].worker_name == victim and events[lost].epoch == 1
        replan = kinds.index("replanning", lost)
        assert victim in events[replan].reason
        resumed = events[kinds.index("resumed", replan)]
        assert resumed.epoch == 2 and resumed.step > 0 and resumed.step % 10 == 0
        assert kinds.index("planned", replan) < kinds.index("resumed", replan)
        assert {e.step for e in events if e.kind == "checkpoint"} >= {10, steps}
        # And the cluster's: four joined, the victim lost.
        cluster_events = cluster.client().events()
        joined = sorted(e.worker_name for e in cluster_events if e.kind == "joined")
        assert joined == sorted(workers)
        assert [e.worker_name for e in cluster_events if e.kind == "lost"] == [victim]
        # `archipelago events JOB` prints the same timeline, a line an event.
        command = [
            "events",
            job_id,
            "--coordinator",
            cluster.address,
            "--operator-token",
            OPERATOR_TOKEN,
            "--ca",
            str(cluster.ca_file),
        ]
        out = subprocess.run(
            [sys.executable, "-m", "archipelago.cli", *command],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        # (Fetched later: a validation may have landed since.)
        assert [line.split()[1] for line in lines][: len(kinds)] == kinds
        assert any(victim in line and "stopped heart-beating" in line for line in lines)

    def test_ctrl_c_drains_a_worker_without_losing_a_step(self, cluster: Cluster) -> None:
        # Three workers for two stages (the killed one is gone): whichever two the planner
        # picks, one is spare.
        workers = alive_workers(cluster)
        assert len(workers) == 3
        # The drain comes within a step or two of the Ctrl-C (near step 10), but warm workers
        # run these steps at tens a second: the job is long enough to be still running.
        steps = 120
        # A checkpoint interval longer than the run: only the drain checkpoints mid-run.
        job_id = cluster.submit(SPEC.format(steps=steps, stages=2, every=1000))
        running = cluster.wait_job(
            job_id, lambda j: j.state == "running" and j.steps_done >= 8, "the job to pass step 8"
        )
        leaving = workers[running.stages[0].worker_name]
        cluster.kill(leaving, signal.SIGINT)
        assert leaving.popen.wait(timeout=120) == 0
        job = cluster.wait_job(
            job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
        )
        assert job.epoch == 2
        metrics = cluster.job(job_id, with_metrics=True).metrics
        drained_at = min(m.step for m in metrics if m.epoch == 2)
        # The new plan starts exactly where the old one stopped: no step ran twice.
        assert drained_at >= 8 and all(m.epoch == 1 for m in metrics if m.step < drained_at)
        assert_losses_match_reference(cluster, job_id, steps)
        # It left for good: it never joined again while it drained and went.
        name = running.stages[0].worker_name
        assert cluster.coordinator is not None
        log = cluster.coordinator.tail(10_000)
        joins = re.findall(rf"worker {name} \(\w+\) at \S+ joined", log)
        assert len(joins) == 1, joins
        wait_for(
            "the drained worker to be marked left",
            lambda: any(
                w.name == running.stages[0].worker_name and w.state == "left"
                for w in cluster.workers_safe()
            ),
            30,
        )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_killed_coordinator_restarts_on_its_store_the_job_completes_and_its_fit_survives(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A coordinator killed mid-job: the one restarted on the same store adopts the job,
    which completes like one uninterrupted process; then the compute model calibrated on
    its steps survives a second restart (one cluster for both, on each store)."""
    store = "" if backend == "sqlite" else request.getfixturevalue("clean_redis_url")
    cluster = Cluster(tmp_path / "cluster", store=store)
    try:
        cluster.start_coordinator()
        for i in range(3):
            cluster.start_worker(f"w{i}")
        # Its workers stall while no coordinator answers (the job stays near step 12), so
        # the restarted one adopts it running whatever the length.
        steps = 60
        job_id = cluster.submit(SPEC.format(steps=steps, stages=3, every=10))
        cluster.wait_job(
            job_id, lambda j: j.state == "running" and j.steps_done >= 12, "the job to pass step 12"
        )
        assert cluster.coordinator is not None
        cluster.kill(cluster.coordinator)
        cluster.start_coordinator("coordinator-2")
        seen = cluster.job(job_id)
        assert seen.job_id == job_id and seen.state in (
            "running",
            "recovering",
            "starting",
            "completed",
        )
        cluster.wait_job(
            job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
        )
        assert_losses_match_reference(cluster, job_id, steps)
        assert_the_calibrated_compute_model_survives_a_restart(cluster, job_id)
    finally:
        cluster.close()


def assert_the_calibrated_compute_model_survives_a_restart(cluster: Cluster, job_id: str) -> None:
    """The completed job's plan has a measured and a calibrated step time; the fitted model
    is in the store, an efficiency for each worker of the plan; a coordinator killed and
    started again on the store gives the same calibrated step time."""
    job = cluster.job(job_id)
    client = cluster.client()
    try:
        before = client.plan(job_id)
    finally:
        client.close()
    assert before.measured_step_s > 0 and before.calibrated_step_s > 0
    # The fitted model is in the store: an efficiency for each profiled worker.
    store = open_store(cluster.store)
    try:
        blob = store.get_blob("compute-model")
    finally:
        store.close()
    assert blob is not None
    fitted = json.loads(blob)["efficiency"]
    assert set(fitted) == {s.worker_id for s in job.stages}
    assert all(v > 0 for v in fitted.values())
    assert cluster.coordinator is not None
    cluster.kill(cluster.coordinator)
    cluster.start_coordinator("coordinator-3")
    client = cluster.client()
    try:
        after = client.plan(job_id)  # no step has run since the restart
    finally:
        client.close()
    assert after.calibrated_step_s == pytest.approx(before.calibrated_step_s, rel=1e-6)


def test_three_workers_train_three_stages_exactly_like_one_process(three_workers: Cluster) -> None:
    cluster = three_workers
    job_id = cluster.submit(SPEC.format(steps=20, stages=3, every=10))
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert len(job.stages) == 3
    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w2"}
    assert job.last_checkpoint == 20
    assert job.bytes_per_step > 0
    assert_losses_match_reference(cluster, job_id, 20)
    # The coordinator evaluates every complete checkpoint on held-out batches: the last
    # one's loss is plain PyTorch's after the same 20 steps.
    job = cluster.wait_job(job_id, lambda j: j.val_step == 20, "the last checkpoint's validation")
    assert job.val_loss == pytest.approx(reference_run(20)[1], abs=1e-4)


def test_a_deeper_schedule_trains_exactly_like_one_process(three_workers: Cluster) -> None:
    """Three stages, each running its forwards ahead (GPipe for the 2 micro-batches of a
    step): the workers run the depth the plan gives them, and every step's loss is still
    plain PyTorch's (backwards run in micro-batch order at any depth)."""
    cluster = three_workers
    spec = SPEC.format(steps=6, stages=3, every=6).replace(
        "parallel: {stages: 3}", "parallel: {stages: 3, warmup: 1}"
    )
    job_id = cluster.submit(spec)
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert len(job.stages) == 3
    client = cluster.client()
    try:
        plan = client.plan(job_id)
    finally:
        client.close()
    assert "schedule: GPipe (every forward first), 1 extra warm-up micro-batch" in plan.text
    assert_losses_match_reference(cluster, job_id, 6)
    # `plan show`'s per-stage rows: predicted, and measured over the steps after the first.
    assert [row[0] for row in plan.stages] == [0, 1, 2]
    for _, predicted, _, measured, waited, steps in plan.stages:
        assert predicted > 0 and measured > 0 and waited >= 0 and steps == 5


def test_worker_with_a_wrong_token_is_refused(three_workers: Cluster) -> None:
    cluster = three_workers
    intruder = cluster.start_worker("intruder", wait=False, token="not-the-token-at-all")
    code = intruder.popen.wait(timeout=60)
    assert code == 2
    assert "refused" in intruder.tail() and "Traceback" not in intruder.tail()
    assert all(w.name != "intruder" for w in cluster.workers_safe())
    client = cluster.client(token="not-the-token-at-all")
    with pytest.raises(Exception, match="refused the token"):
        client.jobs()


def test_topk_at_ratio_one_equals_the_uncompressed_run_and_lossy_topk_moves_fewer_bytes(
    three_workers: Cluster,
) -> None:
    cluster = three_workers
    steps = 6
    base = SPEC.format(steps=steps, stages=2, every=steps)
    runs = {}
    for name, setting in (
        ("exact", "none"),
        ("ratio-1", "{topk: 1.0}"),
        ("lossy", "{topk: 0.05, values: fp16}"),
    ):
        job_id = cluster.submit(base + f"compression: {setting}\n")
        cluster.wait_job(job_id, lambda j: j.state == "completed", f"the {name} job to complete")
        runs[name] = cluster.job(job_id, with_metrics=True)
        client = cluster.client()
        try:
            plan = client.plan(job_id)
        finally:
            client.close()
        if name != "exact":
            assert "sampled_topk" in plan.text, plan.text
    command = [
        "plan",
        "show",
        job_id,
        "--coordinator",
        cluster.address,
        "--operator-token",
        OPERATOR_TOKEN,
        "--ca",
        str(cluster.ca_file),
    ]
    shown = subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "cut links" in shown.stdout and "sampled_topk, x0.05" in shown.stdout, shown.stdout
    assert "step time: predicted" in shown.stdout and "measured" in shown.stdout
    exact = {m.step: m.loss for m in runs["exact"].metrics}
    same = {m.step: m.loss for m in runs["ratio-1"].metrics}
    lossy = {m.step: m.loss for m in runs["lossy"].metrics}
    assert same == exact  # through the codec path, bit for bit
    assert_losses_match_reference(cluster, runs["exact"].job_id, steps)
    # Lossy: it trains (finite losses, not equal), on a fraction of the bytes.
    assert all(math.isfinite(v) for v in lossy.values()) and lossy != exact
    assert runs["lossy"].bytes_per_step < 0.25 * runs["exact"].bytes_per_step
