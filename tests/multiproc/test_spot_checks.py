"""Spot checks in a three-stage pipeline (`coordinator.spot_checks`): the coordinator
recomputes a random micro-batch of a stage after the step ran, from that stage's inputs and
parameters, and compares it with what the next stage received.

Honest workers: every check passes (none accuses anyone) over every step of the job. A
hostile middle stage that computes right and then adds 0.05 to every activation it sends
(`hostile_worker.py shift`: far inside the value guards' bounds) is found by a check,
quarantined on the receiver's word with the evidence, and the job is planned again without
it and completes. One that does the same and answers no spot check is backed off after
three checks in a row withheld, and the job completes without it too. A last stage that
scales the gradients it sends back by 1.05 is found by the check of its backward pass.

Who is where: the even planner places stages in registration order among live workers.
The honest job runs on w0, w1, w2; then w1 and w2 leave and the shifter and w3 join, so the
shifter is the middle stage, sending activations to w3; then w3 leaves and the hider and
w4 join; then the hider leaves and the gradient scaler joins, the last stage after w4.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from archipelago.views import EventView, JobView
from tests.multiproc.hostile_cluster import HostileCluster

pytestmark = pytest.mark.multiproc

STEPS = 8
SPEC = f"""
name: spot
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}}
optimizer: {{name: adamw, lr: 3.0e-3}}
steps: {STEPS}
parallel: {{planner: even}}
checkpoint: {{every: 2}}
trust: {{spot_checks: {{every: 1}}}}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostileCluster]:
    c = HostileCluster(
        tmp_path_factory.mktemp("spot") / "cluster",
        hostile={"shifter": ("shift", 0), "hider": ("hide", 0), "gscaler": ("gscale", 0)},
    )
    try:
        c.start_coordinator()
        for name in ("w0", "w1", "w2"):
            c.start_worker(name)
        yield c
    finally:
        c.close()


def run_to_the_end(cluster: HostileCluster) -> tuple[JobView, list[EventView]]:
    job_id = cluster.submit(SPEC)
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    client = cluster.client()
    try:
        return job, client.events(job_id)
    finally:
        client.close()


def test_honest_stages_pass_every_spot_check(cluster: HostileCluster) -> None:
    job, events = run_to_the_end(cluster)
    placed = [s.worker_name for s in sorted(job.stages, key=lambda s: s.stage)]
    assert placed == ["w0", "w1", "w2"], cluster.logs()
    checks = [e for e in events if e.kind == "spot_check"]
    passed = [e for e in checks if " passed (" in e.text]
    print(f"spot checks: {len(checks)}, passed {len(passed)}; " + "; ".join(e.text for e in checks))
    assert passed, [e.text for e in checks]
    # Every stage was checked: the first two for their activations, the last two for the
    # gradients they send back.
    for stage in range(3):
        assert any(f"stage {stage} of" in e.text for e in passed), stage
    assert any("gradients)" in e.text and "stage 2 of" in e.text for e in passed)
    assert any("(activations and gradients)" in e.text for e in passed)
    assert not [e for e in checks if "differs" in e.text]
    assert not [e for e in events if e.kind in ("suspected", "quarantined")]
    assert job.epoch == 1 and job.recoveries == 0


def test_a_stage_sending_shifted_activations_is_caught_by_a_spot_check(
    cluster: HostileCluster,
) -> None:
    for name in ("w1", "w2"):
        w = next(p for p in cluster.procs if p.name == name)
        cluster.kill(w, signal.SIGINT)
        assert w.popen.wait(timeout=60) == 0
    cluster.start_worker("shifter")
    cluster.start_worker("w3")
    job, events = run_to_the_end(cluster)
    assert "shifter" not in {s.worker_name for s in job.stages}, job.stages
    assert job.epoch >= 2 and job.recoveries >= 1
    mismatches = [e for e in events if e.kind == "spot_check" and "differs" in e.text]
    assert mismatches, [(e.kind, e.text) for e in events]
    print("mismatch:", mismatches[0].text)
    assert "stage 1 of replica 0" in mismatches[0].text
    quarantines = [e for e in events if e.kind == "quarantined" and e.worker_name == "shifter"]
    assert quarantines, [(e.kind, e.text) for e in events]
    text = quarantines[0].text
    assert "spot check of micro-batch" in text and "reported by w3" in text, text
    assert "quarantined worker shifter: spot check" in job.error
    # No honest worker was named.
    assert not [
        e for e in events if e.kind in ("suspected", "quarantined") and e.worker_name != "shifter"
    ]


def test_a_stage_withholding_its_evidence_is_backed_off(cluster: HostileCluster) -> None:
    w3 = next(p for p in cluster.procs if p.name == "w3")
    cluster.kill(w3, signal.SIGINT)
    assert w3.popen.wait(timeout=60) == 0
    cluster.start_worker("hider")
    cluster.start_worker("w4")
    job, events = run_to_the_end(cluster)
    assert "hider" not in {s.worker_name for s in job.stages}, job.stages
    withheld = [e for e in events if e.kind == "spot_check" and "withheld by hider" in e.text]
    print("withheld:", [e.text for e in withheld])
    assert len(withheld) >= 3, [(e.kind, e.text) for e in events]
    # Never compared (no evidence), so never accused; backed off for withholding it.
    assert not [e for e in events if e.kind == "spot_check" and "differs" in e.text]
    backed = [e for e in events if e.kind == "suspected" and e.worker_name == "hider"]
    assert backed and "withheld the evidence of 3 spot checks" in backed[0].text, backed
    assert job.epoch >= 2 and job.recoveries >= 1


def test_a_last_stage_scaling_its_gradients_is_caught_by_a_spot_check(
    cluster: HostileCluster,
) -> None:
    hider = next(p for p in cluster.procs if p.name == "hider")
    cluster.kill(hider, signal.SIGINT)
    assert hider.popen.wait(timeout=60) == 0
    cluster.start_worker("gscaler")
    job, events = run_to_the_end(cluster)
    assert "gscaler" not in {s.worker_name for s in job.stages}, job.stages
    mismatches = [e for e in events if e.kind == "spot_check" and "differs" in e.text]
    assert mismatches, [(e.kind, e.text) for e in events]
    print("mismatch:", mismatches[0].text)
    assert "stage 2 of replica 0: the gradient" in mismatches[0].text
    quarantines = [e for e in events if e.kind == "quarantined" and e.worker_name == "gscaler"]
    assert quarantines and "reported by w4" in quarantines[0].text, [e.text for e in events]
    assert not [
        e for e in events if e.kind in ("suspected", "quarantined") and e.worker_name != "gscaler"
    ]
