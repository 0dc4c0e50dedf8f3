"""Hostile volunteers in a pipeline: one that sends NaN, one that sends gradients scaled by
1e4 (`hostile_worker.py`). Each is found by the stage it sends to (`worker.value_guard`:
values must be finite, and a gradient's norm within 100 x its edge's running median),
quarantined, and the job planned again without it from its last validated checkpoint; its
final validation loss is within 3% of the same job (same spec, same seed) run on honest
workers alone, in the same cluster.

Why a pipeline and not replicas for these two: both are seen in one value, by its norm or a
NaN, without comparing it with anything but the edge's own history. The scaled gradients
start after the edge's warm-up (4 steps of 2 micro-batches), as a gradient scaled from the
first step would set the edge's history itself (see `worker.value_guard`).

Who accuses whom: with the even planner the stages follow registration order. The NaN
sender joins last, so it is the last of three stages and its first NaN gradients reach the
middle one (w1); then w1 leaves, and the scaler is the second of two stages, its gradients
reaching w0. Each accuser accuses for the first time, so it is heard with its full weight
(`coordinator.quarantine`: a second accusation by the same worker would only back the
accused off). The jobs planned again without the hostile worker have fewer stages: a
pipeline trains exactly as one process whatever its cut, so the comparison is fair.
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
name: hostile
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}}
optimizer: {{name: adamw, lr: 3.0e-3}}
steps: {STEPS}
parallel: {{planner: even}}
checkpoint: {{every: 2}}
validation: {{batches: 2}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileCluster]:
    c = HostileCluster(
        tmp_path_factory.mktemp("hostile") / "cluster",
        hostile={"nan-sender": ("nan", 3), "scaler": ("scale", 4)},
    )
    try:
        c.start_coordinator()
        c.start_worker("w0")
        c.start_worker("w1")
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


@pytest.fixture(scope="module")
def clean_val_loss(cluster: HostileCluster) -> float:
    job = run_to_the_end(cluster)
    assert {s.worker_name for s in job.stages} == {"w0", "w1"}
    assert job.val_loss is not None
    return job.val_loss


def assert_quarantined(cluster: HostileCluster, job: JobView, hostile: str, what: str) -> None:
    """The job ran without `hostile` in the end, says why, and its timeline shows it."""
    assert hostile not in {s.worker_name for s in job.stages}
    assert job.epoch >= 2 and job.recoveries >= 1
    client = cluster.client()
    try:
        events = client.events(job.job_id)
        cluster_events = client.events()
    finally:
        client.close()
    quarantines = [e for e in events if e.kind == "quarantined" and e.worker_name == hostile]
    assert quarantines, [(e.kind, e.text) for e in events]
    assert what in quarantines[0].text and "reported by" in quarantines[0].text
    assert any(e.kind == "quarantined" and hostile in e.text for e in cluster_events)
    # The job says so (its last error, kept once it completed).
    assert f"quarantined worker {hostile}: " in job.error and what in job.error


def test_a_worker_sending_nan_is_quarantined_and_the_job_ends_as_without_it(
    cluster: HostileCluster, clean_val_loss: float
) -> None:
    cluster.start_worker("nan-sender")
    job = run_to_the_end(cluster)
    assert_quarantined(cluster, job, "nan-sender", "is not finite")
    print(f"NaN sender: validation loss {job.val_loss:.4f}, honest run {clean_val_loss:.4f}")
    assert job.val_loss == pytest.approx(clean_val_loss, rel=0.03)
    metrics = cluster.job(job.job_id, with_metrics=True).metrics
    assert all(m.loss == m.loss for m in metrics), "a NaN loss was reported"


def test_a_worker_scaling_its_gradients_is_quarantined_and_the_job_ends_as_without_it(
    cluster: HostileCluster, clean_val_loss: float
) -> None:
    w1 = next(p for p in cluster.procs if p.name == "w1")
    cluster.kill(w1, signal.SIGINT)  # leaves: the scaler is w0's only peer, stage 1
    assert w1.popen.wait(timeout=60) == 0
    cluster.start_worker("scaler")
    job = run_to_the_end(cluster)
    # Planned again on w0 alone.
    assert {s.worker_name for s in job.stages} == {"w0"}, (job.epoch, job.error, job.stages)
    assert_quarantined(cluster, job, "scaler", "x median")
    print(f"x1e4 scaler: validation loss {job.val_loss:.4f}, honest run {clean_val_loss:.4f}")
    assert job.val_loss == pytest.approx(clean_val_loss, rel=0.03)
