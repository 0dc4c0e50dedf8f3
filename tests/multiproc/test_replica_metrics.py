"""Per-replica and per-group metrics end to end: a real coordinator and two real worker
processes on loopback running two replicas of one stage under local SGD; every replica's
reports reach the job view, and `status` and `watch` print a line per replica and group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.cli import main
from tests.multiproc.cluster import OPERATOR_TOKEN, Cluster

pytestmark = pytest.mark.multiproc

STEPS = 6
SPEC = f"""
name: replica-metrics
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 4, max_bytes: 200000}}
optimizer: {{name: sgd, lr: 0.1}}
steps: {STEPS}
parallel: {{planner: even, stages: 1, replicas: 2}}
sync: {{kind: local-sgd, period: 2}}
checkpoint: {{every: {STEPS}}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def test_every_replica_reports_and_status_and_watch_print_a_line_for_each(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.start_coordinator()
    for i in range(2):
        cluster.start_worker(f"w{i}")
    job_id = cluster.submit(SPEC)
    cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    job = cluster.job(job_id, with_metrics=True)
    assert job.replicas == 2
    assert sorted(m.step for m in job.metrics) == list(range(STEPS))  # the speaker's losses

    r0, r1 = job.replica_metrics
    assert (r0.replica, r0.speaker, r1.replica, r1.speaker) == (0, True, 1, False)
    for r in (r0, r1):
        assert r.last_step == STEPS - 1 and r.steps == STEPS
        assert r.samples_per_s > 0 and r.sync_bytes_per_step > 0 and r.sync_seconds_per_step > 0
        assert r.staleness == 0  # the last step averages
    (group,) = job.group_metrics
    # Period 2 over 6 steps: averaged after steps 1, 3 and 5, both shares each time.
    assert (group.stage, group.replicas, group.rounds, group.shares) == (0, (0, 1), 3, 2)
    assert group.sync_bytes_per_step == r0.sync_bytes_per_step + r1.sync_bytes_per_step

    command = [
        "--coordinator",
        cluster.address,
        "--operator-token",
        OPERATOR_TOKEN,
        "--ca",
        str(cluster.ca_file),
    ]
    assert main(["status", job_id, *command]) == 0
    out = capsys.readouterr().out
    assert "2 replicas" in out.splitlines()[0]
    assert "replica 0 (speaker): step 5," in out and "replica 1: step 5," in out
    assert "stage 0 sync group (replicas 0, 1)" in out and "3 of the last 6 steps" in out

    assert main(["watch", job_id, *command]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"job {job_id} completed"
    assert [line.split(":")[0].strip() for line in out.splitlines()[1:]] == [
        "replica 0 (speaker)",
        "replica 1",
        "stage 0 sync group (replicas 0, 1)",
    ]
