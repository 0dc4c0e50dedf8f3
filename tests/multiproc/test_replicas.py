"""Data-parallel replicas end to end: a real coordinator and real worker processes on
loopback (four in the plan, a fifth spare), two replicas of a two-stage pipeline whose
gradients are averaged every step, checked against one plain PyTorch process training the
full batch."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
import torch

from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag import model_file
from opdag.reference import ReferenceTrainer
from tests.multiproc.cluster import Cluster

pytestmark = pytest.mark.multiproc

STEPS = 10
SPEC = """
name: replicas
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 4, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {steps}
parallel: {{planner: even, stages: 2, replicas: 2}}
checkpoint: {{every: {every}}}
"""


def reference(steps: int) -> tuple[list[float], ReferenceTrainer]:
    """The losses of one plain PyTorch process training the full batch, and its trainer."""
    spec = parse_job_spec(SPEC.format(steps=steps, every=steps))
    trainer = ReferenceTrainer(
        model=spec.model.zoo,
        model_args=spec.model.args_dict(),
        data=spec.data,
        optimizer=spec.optimizer,
        seed=spec.seed,
    )
    return [trainer.train_step(step) for step in range(steps)], trainer


def largest_loss_difference(cluster: Cluster, job_id: str, want: list[float]) -> float:
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    assert sorted(losses) == list(range(len(want))), "a step has no loss"
    return max(abs(losses[s] - want[s]) for s in range(len(want)))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator and workers w0..w4, shared by this module's tests in their order: each
    runs its own job on it (`even` places 2 x 2 on the first four in registration order);
    the Ctrl-C test's w2 leaves for good, so the coordinator's restart comes after it."""
    c = Cluster(tmp_path_factory.mktemp("replicas") / "cluster")
    try:
        c.start_coordinator()
        for i in range(5):
            c.start_worker(f"w{i}")
        yield c
    finally:
        c.close()


def stored_state(cluster: Cluster, job_id: str, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the job's checkpoint at `step`, read from the store."""
    store = open_store(cluster.store)
    try:
        parts = store.checkpoint_parts(job_id, step)
    finally:
        store.close()
    state: dict[str, torch.Tensor] = {}
    for blob in parts:
        state.update(model_file.decode_state(blob, f"checkpoint {step}"))
    return state


def test_two_replicas_of_two_stages_train_exactly_like_one_process(cluster: Cluster) -> None:
    job_id = cluster.submit(SPEC.format(steps=STEPS, every=5))
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert len(job.stages) == 4
    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w2", "w3"}
    assert sorted(s.stage for s in job.stages) == [0, 0, 1, 1]
    assert sorted((s.replica, s.stage) for s in job.stages) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert job.last_checkpoint == STEPS
    plan = cluster.client().plan(job_id)
    assert "2 stages x 2 replicas" in plan.text and "sync groups" in plan.text

    want, trainer = reference(STEPS)
    loss_diff = largest_loss_difference(cluster, job_id, want)
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"

    # One copy of each stage in the checkpoint, the parameters the reference reached.
    # Measured over all parameters together: a tensor whose true gradient is zero (the key
    # part of attention's qkv bias: softmax ignores a shift of every key) takes Adam steps
    # on float noise alone, so it differs per tensor by ~2e-4 even between two plain
    # PyTorch runs that only group the same micro-batches differently.
    state = stored_state(cluster, job_id, STEPS)
    params = {n: p.detach() for n, p in trainer.model.named_parameters()}
    assert set(params) <= set(state)
    diff = sum(float((state[n] - p).square().sum()) for n, p in params.items()) ** 0.5
    norm = sum(float(p.square().sum()) for p in params.values()) ** 0.5
    worst = diff / norm
    assert worst < 1e-5, f"relative parameter difference {worst:.3g}"
    print(f"largest loss difference {loss_diff:.3g}, relative parameter difference {worst:.3g}")


def test_ctrl_c_of_a_replica_worker_drains_the_job_without_losing_a_step(
    cluster: Cluster,
) -> None:
    workers = {p.name: p for p in cluster.procs if p.name != "coordinator"}
    steps = 60
    # A checkpoint interval longer than the run: only the drain checkpoints mid-run.
    job_id = cluster.submit(SPEC.format(steps=steps, every=1000))
    cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 8, "the job to pass step 8"
    )
    leaving = workers["w2"]  # replica 1's stage 0
    cluster.kill(leaving, signal.SIGINT)
    assert leaving.popen.wait(timeout=120) == 0
    job = cluster.wait_job(
        job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
    )
    assert job.epoch == 2
    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w3", "w4"}
    metrics = cluster.job(job_id, with_metrics=True).metrics
    drained_at = min(m.step for m in metrics if m.epoch == 2)
    # The new plan starts exactly where the old one stopped: no step ran twice.
    assert drained_at >= 8 and all(m.epoch == 1 for m in metrics if m.step < drained_at)
    want, _ = reference(steps)
    loss_diff = largest_loss_difference(cluster, job_id, want)
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"


def test_a_restarted_coordinator_takes_back_a_job_of_replicas(cluster: Cluster) -> None:
    steps = 60
    job_id = cluster.submit(SPEC.format(steps=steps, every=10))
    cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 12, "the job to pass step 12"
    )
    assert cluster.coordinator is not None
    cluster.kill(cluster.coordinator)
    cluster.start_coordinator("coordinator-2")
    job = cluster.wait_job(
        job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
    )
    assert len(job.stages) == 4
    want, _ = reference(steps)
    loss_diff = largest_loss_difference(cluster, job_id, want)
    assert loss_diff < 1e-4, f"largest loss difference {loss_diff:.3g}"
