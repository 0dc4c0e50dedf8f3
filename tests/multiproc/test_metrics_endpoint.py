"""`/metrics` on a real cluster: scraped through the dashboard with a bearer token while a
job trains, parsed with prometheus_client's own parser, every series with the value the
coordinator's API gives at the same time; a worker killed afterwards counts as lost; and
`archipelago metrics` exports the finished job as CSV and as a TensorBoard run."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from archipelago.client import JobView
from tests.multiproc.cluster import OPERATOR_TOKEN, TOKEN, Cluster, wait_for

pytestmark = pytest.mark.multiproc

STEPS = 120
SPEC = f"""
name: scraped
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
parallel: {{stages: 2}}
compression: {{topk: 0.25}}
checkpoint: {{every: {STEPS}}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", dashboard=True)
    yield c
    c.close()


def scrape(url: str, token: str = OPERATOR_TOKEN) -> dict[str, list[Sample]]:
    request = urllib.request.Request(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [
        s.value
        for family in samples.values()
        for s in family
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_metrics_during_a_job_and_the_export_after_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_coordinator()
    workers = {name: cluster.start_worker(name) for name in ("w0", "w1")}
    url = cluster.dashboard_url.rstrip("/")
    assert url.startswith("http://127.0.0.1:"), cluster.logs()
    client = cluster.client()
    try:
        wait_for("both links to be measured", lambda: len(client.links()) == 2, 60)
        ids = {w.name: w.worker_id for w in client.workers()}
    finally:
        client.close()

    job_id = cluster.submit(SPEC)
    before = cluster.wait_job(
        job_id, lambda j: j.state == "running" and j.steps_done >= 5, "the job to train"
    )
    m = scrape(url)
    after = cluster.job(job_id, with_metrics=True)

    # Workers: both busy on the job, beating.
    assert value(m, "archipelago_workers", state="busy") == 2
    assert value(m, "archipelago_workers", state="idle") == 0
    assert value(m, "archipelago_workers", state="lost") == 0
    for name, wid in ids.items():
        w = {"worker_id": wid, "worker_name": name}
        assert value(m, "archipelago_worker_info", state="busy", job_id=job_id, **w) == 1
        assert 0 <= value(m, "archipelago_worker_heartbeat_age_seconds", **w) < 2.0
        assert value(m, "archipelago_worker_flops_per_second", **w) > 1e6
        assert value(m, "archipelago_worker_memory_bytes", **w) > 1 << 20

    # The job: its progress, loss and pace as the API gives them around the scrape.
    assert value(m, "archipelago_jobs", state="running") == 1
    job = {"job_id": job_id, "job_name": "scraped"}
    assert value(m, "archipelago_job_info", state="running", **job) == 1
    done = value(m, "archipelago_job_steps_done", **job)
    assert before.steps_done <= done <= after.steps_done
    assert value(m, "archipelago_job_spec_steps", **job) == STEPS
    losses = {s.step: s.loss for s in after.metrics}
    assert value(m, "archipelago_job_loss", **job) == pytest.approx(losses[int(done) - 1], abs=1e-9)
    step_s = value(m, "archipelago_job_step_seconds", **job)
    assert 0 < step_s < 10
    assert value(m, "archipelago_job_samples_per_second", **job) == pytest.approx(8 / step_s)
    assert value(m, "archipelago_job_predicted_step_seconds", **job) > 0
    assert value(m, "archipelago_job_bytes_per_step", **job) > 0
    assert value(m, "archipelago_job_plan_epoch", **job) == after.epoch

    # The plan's one cut link, compressed to a quarter of its activations.
    link = {**job, "src_stage": "0", "dst_stage": "1", "codec": "sampled_topk"}
    dense = value(m, "archipelago_job_link_dense_bytes", **link)
    wire = value(m, "archipelago_job_link_wire_bytes", **link)
    assert 0 < wire < dense
    assert value(m, "archipelago_job_link_compression_ratio", **link) == pytest.approx(dense / wire)

    # The measured links between the two workers.
    for a, b in (("w0", "w1"), ("w1", "w0")):
        pair = {"src": ids[a], "dst": ids[b], "src_name": a, "dst_name": b}
        assert value(m, "archipelago_link_bandwidth_bytes_per_second", **pair) > 10e6 / 8
        assert 0 < value(m, "archipelago_link_rtt_seconds", **pair) < 1.0
        assert value(m, "archipelago_link_measured_timestamp_seconds", **pair) > 1.7e9

    # Heart-beats every 0.3 s; the store written by every step.
    beats = value(m, "archipelago_heartbeat_interval_seconds_count")
    assert beats > 5
    assert 0.1 < value(m, "archipelago_heartbeat_interval_seconds_sum") / beats < 1.5
    assert value(m, "archipelago_store_operation_seconds_count", op="put_metric") >= 2 * 5
    assert value(m, "archipelago_store_operation_seconds_count", op="put_job") >= 1

    # A wrong token gets nothing, nor does the volunteers' join token.
    for wrong in ("not-the-token", TOKEN):
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(url, token=wrong)
        assert refused.value.code == 401

    final = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    check_export(job_id, cluster.job(job_id, with_metrics=True), cluster, tmp_path)
    assert final.steps_done == STEPS

    # A worker killed: lost once the coordinator notices.
    cluster.kill(workers["w1"], signal.SIGKILL)
    wait_for(
        "the killed worker to count as lost",
        lambda: value(scrape(url), "archipelago_workers", state="lost") == 1,
        30,
    )
    m = scrape(url)
    assert value(m, "archipelago_workers", state="idle") == 1
    assert value(m, "archipelago_jobs", state="completed") == 1
    assert value(m, "archipelago_job_samples_per_second", **job) == 0
    assert value(m, "archipelago_worker_info", worker_id=ids["w1"], state="lost") == 1


def check_export(job_id: str, job: JobView, cluster: Cluster, tmp_path: Path) -> None:
    """`archipelago metrics` of the finished job: CSV and TensorBoard, and its refusals."""
    address = cluster.address
    common = [
        "--coordinator",
        address,
        "--operator-token",
        OPERATOR_TOKEN,
        "--ca",
        str(cluster.ca_file),
    ]
    losses = {s.step: s.loss for s in job.metrics}
    assert sorted(losses) == list(range(STEPS))

    out = cli("metrics", job_id, "--csv", str(tmp_path / "m.csv"), *common)
    assert out.returncode == 0, out.stderr
    # Every stored record: each stage's, each step.
    assert out.stdout.strip() == (
        f"job {job_id} (scraped): {2 * STEPS} records written to {tmp_path / 'm.csv'}"
    )
    with (tmp_path / "m.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), int(r["stage"])) for r in rows] == [
        (step, stage) for step in range(STEPS) for stage in (0, 1)
    ]
    for r in rows:
        # The loss is the last stage's; both stages send (activations, gradients).
        if r["stage"] == "1":
            assert float(r["loss"]) == losses[int(r["step"])]
        else:
            assert r["loss"] == ""
        assert float(r["step_seconds"]) > 0 and float(r["compute_seconds"]) > 0
        assert int(r["bytes"]) > 0 and r["replica"] == "0" and r["epoch"] == "1"

    out = cli("metrics", job_id, "--tensorboard", str(tmp_path / "tb"), *common)
    assert out.returncode == 0, out.stderr
    assert f"{STEPS} steps written to TensorBoard run {tmp_path / 'tb'}" in out.stdout
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in got] == list(range(STEPS))
    assert [v for _, v in got] == pytest.approx([losses[s] for s in range(STEPS)], rel=1e-6)
    for tag in ("samples_per_s", "step_seconds", "bytes_per_step"):
        points = events.Scalars(tag)
        assert len(points) == STEPS and all(math.isfinite(p.value) for p in points), tag
    # A step's bytes are both stages' together, as the job's own figure is (of the newest
    # step both had reported when the last loss came).
    exported = {e.step: e.value for e in events.Scalars("bytes_per_step")}
    assert job.bytes_per_step in {exported[s] for s in range(STEPS - 4, STEPS)}
    assert exported[STEPS - 1] == sum(int(r["bytes"]) for r in rows if r["step"] == str(STEPS - 1))

    out = cli("metrics", "no-such-job", "--csv", str(tmp_path / "x.csv"), *common)
    assert out.returncode == 2
    assert "no job 'no-such-job'" in out.stderr
    assert not (tmp_path / "x.csv").exists()
