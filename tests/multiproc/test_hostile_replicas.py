"""A hostile replica that flips the sign of the gradients it shares with its sync group
(`hostile_worker.py flip`): found by the group's robust aggregate, quarantined, and the job
planned again without it; its final validation loss is within 3% of the same job (same
spec, same seed) run on honest workers alone, in the same cluster.

Why replicas: a flipped gradient has the norm of an honest one, so no check of one value
against its edge's history can see it (`worker.value_guard`); a pipeline stage has nothing
else to compare a gradient with. Three replicas of a stage can: with `sync: {aggregate:
median}` every member compares the three shares (`worker.robust_aggregate`: a flipped
share points away from the group's coordinate-wise median), leaves the outlier out and
names it, and the two honest members' accusations together quarantine it
(`coordinator.quarantine`). With two replicas there would be no majority to tell which one
is wrong.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from archipelago.views import JobView
from tests.multiproc.hostile_cluster import HostileCluster

pytestmark = pytest.mark.multiproc

STEPS = 8
SPEC = f"""
name: hostile-replicas
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 6, micro_batches: 3, max_bytes: 200000}}
optimizer: {{name: adamw, lr: 3.0e-3}}
steps: {STEPS}
parallel: {{planner: even, stages: 1, replicas: 3}}
sync: {{kind: sync, aggregate: median}}
checkpoint: {{every: 2}}
validation: {{batches: 2}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileCluster]:
    c = HostileCluster(
        tmp_path_factory.mktemp("hostile-replicas") / "cluster",
        hostile={"flipper": ("flip", 2)},
    )
    try:
        c.start_coordinator()
        for name in ("w0", "w1", "w2"):
            c.start_worker(name)
        yield c
    finally:
        c.close()


def run_to_the_end(cluster: HostileCluster) -> JobView:
    job_id = cluster.submit(SPEC)
    return cluster.wait_job(
        job_id,
        lambda j: j.state == "completed" and j.val_step == STEPS,
        "the job to complete and its last checkpoint to be validated",
    )


def test_a_replica_flipping_its_gradients_is_quarantined_and_the_job_ends_as_without_it(
    cluster: HostileCluster,
) -> None:
    clean = run_to_the_end(cluster)
    assert {s.worker_name for s in clean.stages} == {"w0", "w1", "w2"}
    assert clean.val_loss is not None and clean.epoch == 1

    w2 = next(p for p in cluster.procs if p.name == "w2")
    cluster.kill(w2, signal.SIGINT)  # leaves, so the hostile worker takes its place
    assert w2.popen.wait(timeout=60) == 0
    cluster.start_worker("flipper")
    cluster.start_worker("w3")  # registered after it: the plan takes w0, w1, flipper
    job = run_to_the_end(cluster)

    assert {s.worker_name for s in job.stages} == {"w0", "w1", "w3"}
    assert job.epoch >= 2 and "quarantined worker flipper: " in job.error
    assert "cosine" in job.error and "reported by" in job.error
    client = cluster.client()
    try:
        events = client.events(job.job_id)
    finally:
        client.close()
    assert any(e.kind == "quarantined" and e.worker_name == "flipper" for e in events)
    print(f"sign flipper: validation loss {job.val_loss:.4f}, honest run {clean.val_loss:.4f}")
    assert job.val_loss == pytest.approx(clean.val_loss, rel=0.03)
