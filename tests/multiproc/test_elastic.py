"""Elastic replicas end to end (`coordinator.elastic`): real coordinator and worker
processes on loopback.

- A replica's worker killed with SIGKILL: the job goes on with the intact replica to the
  next step boundary and is planned again from its state there, not from a checkpoint (the
  job checkpoints only at its end). The rounds that lacked the dead member are announced
  in the step reports (`shares` below 2), and the losses equal one plain PyTorch process
  exactly up to the first announced round: nothing partial was applied before it.
- A worker joining a running job with `replicas: auto`: the job drains at a step boundary
  and is planned again with two replicas, and its samples/s rise; every step of the run,
  before and after, has the loss of one plain PyTorch process training the full batch
  (lossless `sync`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.planning.jobspec import parse_job_spec
from coordinator.store import open_store
from opdag.reference import ReferenceTrainer
from tests.multiproc.cluster import Cluster

pytestmark = pytest.mark.multiproc

SPEC = """
name: elastic
model: {{zoo: gpt, args: {{layers: 2, d_model: {d_model}, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: {batch}, micro_batches: 4, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {steps}
parallel: {parallel}
checkpoint: {{every: 1000}}
"""


def reference(spec_yaml: str) -> list[float]:
    """The losses of one plain PyTorch process training the full batch every step."""
    spec = parse_job_spec(spec_yaml)
    trainer = ReferenceTrainer(
        model=spec.model.zoo,
        model_args=spec.model.args_dict(),
        data=spec.data,
        optimizer=spec.optimizer,
        seed=spec.seed,
    )
    return [trainer.train_step(step) for step in range(spec.steps)]


def records(cluster: Cluster, job_id: str) -> list[dict[str, Any]]:
    store = open_store(cluster.store)
    try:
        return store.metrics(job_id)
    finally:
        store.close()


def losses_by_step(rows: list[dict[str, Any]]) -> dict[int, list[tuple[int, float]]]:
    """Per step, the (epoch, loss) the speaker reported: one entry when no step ran twice."""
    out: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        if "loss" in r:
            out.setdefault(int(r["step"]), []).append((int(r["epoch"]), float(r["loss"])))
    return out


def samples_per_s(rows: list[dict[str, Any]], epoch: int, batch: int) -> float:
    """Samples/s of one plan: batch x steps between its first and last loss report."""
    at = sorted(
        (int(r["step"]), float(r["at"])) for r in rows if "loss" in r and r["epoch"] == epoch
    )
    (s0, t0), (s1, t1) = at[1], at[-1]  # the plan's first step is its warm-up
    return batch * (s1 - s0) / (t1 - t0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def test_a_killed_replica_worker_leaves_and_the_job_goes_on_from_the_intact_replica(
    cluster: Cluster,
) -> None:
    cluster.start_coordinator()
    # Five workers for 2 stages x 2 replicas: `even` takes w0..w3 (replica 1 on w2, w3).
    workers = {f"w{i}": cluster.start_worker(f"w{i}") for i in range(5)}
    steps = 40
    parallel = "{planner: even, stages: 2, replicas: 2}"
    spec = SPEC.format(d_model=64, batch=8, steps=steps, parallel=parallel)
    job_id = cluster.submit(spec)
    running = cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 8, "the job to pass step 8"
    )
    assert {(s.worker_name, s.replica) for s in running.stages} == {
        ("w0", 0),
        ("w1", 0),
        ("w2", 1),
        ("w3", 1),
    }
    cluster.kill(workers["w3"])  # SIGKILL: replica 1's stage 1, mid-run
    job = cluster.wait_job(
        job_id, lambda j: j.state == "completed", "the job to complete", timeout=240
    )
    assert job.epoch == 2 and job.recoveries == 1
    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w2", "w4"}

    rows = records(cluster, job_id)
    by_step = losses_by_step(rows)
    # Every step ran exactly once: the second plan starts where replica 0 stopped.
    assert sorted(by_step) == list(range(steps))
    assert all(len(v) == 1 for v in by_step.values()), "a step ran twice"
    resumed = min(s for s, v in by_step.items() if v[0][0] == 2)
    assert resumed > 8, f"the job went back to step {resumed}"
    assert all(v[0][0] == 1 for s, v in by_step.items() if s < resumed)

    # The rounds the kept replica completed without the dead member, as it announced them.
    partial = sorted(
        {int(r["step"]) for r in rows if r["epoch"] == 1 and 0 < int(r.get("shares", 0)) < 2}
    )
    assert partial, "no round was announced as partial, yet replica 1 died mid-run"
    assert all(
        int(r.get("shares", 0)) == 2
        for r in rows
        if r["epoch"] == 1 and int(r["step"]) < partial[0] and r.get("replica", 0) == 0
    ), "a step before the first announced partial round was not averaged over both replicas"
    want = reference(spec)
    diffs = {s: abs(by_step[s][0][1] - want[s]) for s in range(steps)}
    exact_until = next((s for s in range(steps) if diffs[s] > 1e-4), steps)
    assert exact_until >= partial[0], (
        f"step {exact_until} differs from one process ({diffs[exact_until]:.3g}) before any "
        f"round was announced partial (first: step {partial[0]})"
    )
    assert max(diffs[s] for s in range(partial[0])) < 1e-4
    print(
        f"killed at about step 8; rounds announced partial: steps {partial}; resumed at "
        f"step {resumed} in epoch 2; losses equal one process up to step {exact_until - 1}; "
        f"final loss {by_step[steps - 1][0][1]:.4f} against {want[-1]:.4f}"
    )


def test_a_joining_worker_becomes_a_replica_and_the_loss_curve_goes_on(cluster: Cluster) -> None:
    # Equal declared speeds: a speed measured while another process trains on the same two
    # cores would make the joiner look too slow to be worth a replica.
    cluster.extra_worker_args = ["--gflops", "50"]
    cluster.start_coordinator()
    cluster.start_worker("w0")
    # Enough compute per step that a second replica's share clearly outweighs averaging
    # its gradients, even priced on a slow loopback measurement: a large batch of a model
    # with few parameters.
    steps, batch = 50, 256
    parallel = "{planner: opfence, stages: 1, replicas: auto}"
    spec = SPEC.format(d_model=128, batch=batch, steps=steps, parallel=parallel)
    job_id = cluster.submit(spec)
    first = cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 5, "the job to pass step 5"
    )
    assert [s.worker_name for s in first.stages] == ["w0"]
    cluster.start_worker("w1")
    job = cluster.wait_job(
        job_id, lambda j: j.state == "completed", "the job to complete", timeout=300
    )
    assert job.epoch == 2, "the joining worker was not taken in"
    assert sorted((s.replica, s.worker_name) for s in job.stages) == [(0, "w0"), (1, "w1")]

    rows = records(cluster, job_id)
    by_step = losses_by_step(rows)
    assert sorted(by_step) == list(range(steps))
    assert all(len(v) == 1 for v in by_step.values()), "a step ran twice"
    joined = min(s for s, v in by_step.items() if v[0][0] == 2)
    assert 5 < joined < steps - 5
    # One plain process training the full batch, before and after the join.
    want = reference(spec)
    worst = max(abs(by_step[s][0][1] - want[s]) for s in range(steps))
    assert worst < 1e-4, f"largest loss difference {worst:.3g}"
    # Both replicas report their steps in the second plan.
    assert {r.get("replica", 0) for r in rows if r["epoch"] == 2} == {0, 1}
    before, after = samples_per_s(rows, 1, batch), samples_per_s(rows, 2, batch)
    # Twice the compute for the same batch (the machine has two cores): the pace must rise.
    assert after > before, f"{before:.1f} samples/s with one replica, {after:.1f} with two"
    print(
        f"joined at step {joined}: 1 -> 2 replicas; {before:.1f} -> {after:.1f} samples/s "
        f"(x{after / before:.2f}); largest loss difference from one process {worst:.3g}"
    )
