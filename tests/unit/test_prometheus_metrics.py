"""The coordinator's Prometheus exposition, parsed with prometheus_client's own parser: every
series carries the value the coordinator's state implies (workers by state, each worker's
figures, jobs by state, each job's progress, loss, pace and plan, the plan's compressed
links, the measured links), and the histograms count what was observed."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator

import prometheus_client
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from coordinator.dashboard.prometheus import CoordinatorMetrics
from coordinator.job_record import Job
from coordinator.jobs import JobManager
from coordinator.link_survey import LinkProber, LinkRecord
from coordinator.planning.jobspec import parse_job_spec
from coordinator.planning.plan import LinkCodec, Placement, Plan
from coordinator.registry import Registry
from coordinator.states import JobState
from coordinator.store import SQLiteStore
from coordinator.store.timed import TimedStore
from coordinator.worker_client import WorkerClient

pytestmark = pytest.mark.unit

SPEC = {
    "name": "tiny",
    "model": {"zoo": "gpt", "args": {"layers": 1, "d_model": 16, "heads": 2, "context": 8}},
    "data": {"corpus": "stdlib-text", "batch_size": 8, "micro_batches": 2},
    "steps": 40,
}


class Coordinator:
    """The coordinator's in-memory state, as `coordinator.main` wires it, without a network."""

    def __init__(self) -> None:
        self.store = TimedStore(SQLiteStore(":memory:"))
        self.registry = Registry(timeout_s=5.0)
        self.workers = WorkerClient(token="t" * 16, tls=None)
        self.links = LinkProber(self.registry, self.workers, self.store)
        self.manager = JobManager(self.store, self.registry, self.workers, links=self.links)
        self.metrics = CoordinatorMetrics(self.manager, self.registry, self.links)
        self.store.observe = self.metrics.observe_store
        self.registry.on_heartbeat_gap = self.metrics.observe_heartbeat

    def scrape(self) -> dict[str, list[Sample]]:
        body, content_type = asyncio.run(self.metrics.exposition())
        assert content_type == prometheus_client.CONTENT_TYPE_LATEST
        families = text_string_to_metric_families(body.decode())
        return {f.name: f.samples for f in families}


@pytest.fixture
def coord() -> Iterator[Coordinator]:
    c = Coordinator()
    yield c
    c.store.close()


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


def register(coord: Coordinator, n: int) -> list[str]:
    ids = []
    for i in range(n):
        w = coord.registry.register(
            name=f"w{i}",
            address=f"127.0.0.1:{7400 + i}",
            gflops=10.0 + i,
            memory_bytes=(i + 1) << 30,
            device="cpu",
            threads=1,
        )
        ids.append(w.worker_id)
    return ids


def running_job(worker_ids: list[str]) -> Job:
    spec = parse_job_spec(yaml.safe_dump(SPEC))
    placements = tuple(
        Placement(s, wid, f"w{s}", f"127.0.0.1:{7400 + s}", 10, 1000, 1e6)
        for s, wid in enumerate(worker_ids)
    )
    plan = Plan(
        job_id="job-a",
        epoch=2,
        planner="opfence",
        start_step=0,
        assignment={},
        placements=placements,
        predicted_step_s=0.4,
        codecs=(LinkCodec(0, 1, "sampled_topk", 0.1, "fp16", 40_000, 2_500, 0.003),),
    )
    job = Job(job_id="job-a", name="tiny", spec=spec, state=JobState.RUNNING, epoch=2, plan=plan)
    job.steps_done, job.loss, job.step_seconds, job.bytes_per_step = 7, 2.5, 0.5, 12_345
    job.recoveries, job.last_checkpoint = 1, 5
    job.val_loss, job.val_step = 2.75, 5
    return job


def test_workers_by_state_and_each_workers_figures(coord: Coordinator) -> None:
    ids = register(coord, 3)
    lost = coord.registry.workers[ids[2]]
    lost.last_seen -= 60  # silent for a minute: the next sweep declares it lost
    assert coord.registry.expire() == [lost]
    coord.registry.assign((ids[0],), "job-a", 1)
    m = coord.scrape()
    assert value(m, "archipelago_workers", state="idle") == 1
    assert value(m, "archipelago_workers", state="busy") == 1
    assert value(m, "archipelago_workers", state="lost") == 1
    assert value(m, "archipelago_workers", state="left") == 0
    for i, wid in enumerate(ids):
        labels = {"worker_id": wid, "worker_name": f"w{i}"}
        assert value(m, "archipelago_worker_flops_per_second", **labels) == (10.0 + i) * 1e9
        assert value(m, "archipelago_worker_memory_bytes", **labels) == (i + 1) << 30
    age = value(m, "archipelago_worker_heartbeat_age_seconds", worker_id=ids[2])
    assert 60 <= age < 70
    assert 0 <= value(m, "archipelago_worker_heartbeat_age_seconds", worker_id=ids[0]) < 5
    info = value(
        m, "archipelago_worker_info", worker_id=ids[0], state="busy", job_id="job-a", device="cpu"
    )
    assert info == 1
    assert value(m, "archipelago_worker_info", worker_id=ids[2], state="lost") == 1


def test_jobs_by_state_and_each_jobs_progress_loss_pace_and_plan(coord: Coordinator) -> None:
    ids = register(coord, 2)
    coord.manager.table.adopt(running_job(ids))
    queued = Job(job_id="job-b", name="waiting", spec=parse_job_spec(yaml.safe_dump(SPEC)))
    coord.manager.table.adopt(queued)
    m = coord.scrape()
    assert value(m, "archipelago_jobs", state="running") == 1
    assert value(m, "archipelago_jobs", state="queued") == 1
    assert value(m, "archipelago_jobs", state="completed") == 0
    a = {"job_id": "job-a", "job_name": "tiny"}
    assert value(m, "archipelago_job_info", state="running", planner="opfence", **a) == 1
    assert value(m, "archipelago_job_steps_done", **a) == 7
    assert value(m, "archipelago_job_spec_steps", **a) == 40
    assert value(m, "archipelago_job_loss", **a) == 2.5
    assert value(m, "archipelago_job_step_seconds", **a) == 0.5
    assert value(m, "archipelago_job_predicted_step_seconds", **a) == 0.4
    assert value(m, "archipelago_job_samples_per_second", **a) == 8 / 0.5
    assert value(m, "archipelago_job_bytes_per_step", **a) == 12_345
    assert value(m, "archipelago_job_plan_epoch", **a) == 2
    assert value(m, "archipelago_job_recoveries", **a) == 1
    assert value(m, "archipelago_job_last_checkpoint_step", **a) == 5
    assert value(m, "archipelago_job_validation_loss", **a) == 2.75
    # A job with no step yet: no loss (NaN stays NaN), no pace, no plan.
    b = {"job_id": "job-b"}
    assert math.isnan(value(m, "archipelago_job_loss", **b))
    assert math.isnan(value(m, "archipelago_job_validation_loss", **b))
    assert math.isnan(value(m, "archipelago_job_step_seconds", **b))
    assert math.isnan(value(m, "archipelago_job_predicted_step_seconds", **b))
    assert value(m, "archipelago_job_samples_per_second", **b) == 0
    assert value(m, "archipelago_job_steps_done", **b) == 0
    assert value(m, "archipelago_job_info", state="queued", planner="", **b) == 1


def test_a_job_that_ended_reports_no_pace_and_no_links(coord: Coordinator) -> None:
    job = running_job(register(coord, 2))
    job.state = JobState.COMPLETED
    coord.manager.table.adopt(job)
    m = coord.scrape()
    assert value(m, "archipelago_job_samples_per_second", job_id="job-a") == 0
    assert value(m, "archipelago_job_loss", job_id="job-a") == 2.5
    assert m["archipelago_job_link_wire_bytes"] == []


def test_the_plans_compressed_links_dense_and_wire_bytes_and_ratio(coord: Coordinator) -> None:
    coord.manager.table.adopt(running_job(register(coord, 2)))
    m = coord.scrape()
    link = {"job_id": "job-a", "src_stage": "0", "dst_stage": "1", "codec": "sampled_topk"}
    assert value(m, "archipelago_job_link_dense_bytes", **link) == 40_000
    assert value(m, "archipelago_job_link_wire_bytes", values="fp16", **link) == 2_500
    assert value(m, "archipelago_job_link_compression_ratio", **link) == 16.0
    assert value(m, "archipelago_job_link_predicted_seconds", **link) == 0.003


def test_measured_links_at_the_workers_present_addresses_only(coord: Coordinator) -> None:
    a, b, c = register(coord, 3)
    addr = {w: coord.registry.workers[w].address for w in (a, b, c)}
    now = time.time()
    coord.links.links = {
        (a, b): LinkRecord(a, b, addr[a], addr[b], 1.25e6, 0.02, now - 30),
        (b, a): LinkRecord(b, a, addr[b], addr[a], 2.5e6, 0.03, now - 10),
        # Failed, and measured at an address the worker no longer has: neither is current.
        (a, c): LinkRecord(a, c, addr[a], addr[c], 0.0, 0.0, now, "unreachable"),
        (c, a): LinkRecord(c, a, "10.0.0.9:1", addr[a], 9e9, 0.001, now),
    }
    m = coord.scrape()
    ab = {"src": a, "dst": b, "src_name": "w0", "dst_name": "w1"}
    assert value(m, "archipelago_link_bandwidth_bytes_per_second", **ab) == 1.25e6
    assert value(m, "archipelago_link_rtt_seconds", **ab) == 0.02
    assert value(m, "archipelago_link_measured_timestamp_seconds", **ab) == now - 30
    assert value(m, "archipelago_link_bandwidth_bytes_per_second", src=b, dst=a) == 2.5e6
    assert len(m["archipelago_link_bandwidth_bytes_per_second"]) == 2
    # A measurement that lands, and a worker that moves, show in the next scrape.
    coord.links.links[(a, c)] = LinkRecord(a, c, addr[a], addr[c], 5e5, 0.05, now)
    coord.registry.workers[b].address = "127.0.0.1:9999"
    m = coord.scrape()
    assert value(m, "archipelago_link_bandwidth_bytes_per_second", src=a, dst=c) == 5e5
    assert len(m["archipelago_link_bandwidth_bytes_per_second"]) == 1


def test_heartbeat_gaps_and_store_calls_fill_their_histograms(coord: Coordinator) -> None:
    (wid,) = register(coord, 1)
    w = coord.registry.workers[wid]
    w.last_seen -= 0.7
    coord.registry.heartbeat(wid, ("", 0, 0, "idle"))
    w.last_seen -= 2.2
    coord.registry.heartbeat(wid, ("", 0, 0, "idle"))
    coord.store.put_blob("k", b"v")
    coord.store.get_blob("k")
    coord.store.get_blob("k")
    m = coord.scrape()
    name = "archipelago_heartbeat_interval_seconds"
    assert value(m, f"{name}_count") == 2
    assert 2.9 <= value(m, f"{name}_sum") < 3.5
    assert value(m, f"{name}_bucket", le="0.5") == 0
    assert value(m, f"{name}_bucket", le="1.0") == 1
    assert value(m, f"{name}_bucket", le="3.0") == 2
    store = "archipelago_store_operation_seconds"
    assert value(m, f"{store}_count", op="put_blob") == 1
    assert value(m, f"{store}_count", op="get_blob") == 2
    assert value(m, f"{store}_bucket", op="get_blob", le="+Inf") == 2


def test_a_scrape_of_500_workers_and_20_jobs_reads_nothing_from_the_store(
    coord: Coordinator,
) -> None:
    ids = register(coord, 500)
    for j in range(20):
        job = running_job(ids[2 * j : 2 * j + 2])
        job.job_id = f"job-{j}"
        coord.manager.table.adopt(job)
    calls: list[str] = []
    coord.store.observe = lambda op, s: calls.append(op)
    m = coord.scrape()
    assert calls == []
    assert len(m["archipelago_worker_heartbeat_age_seconds"]) == 500
    assert value(m, "archipelago_workers", state="idle") == 500
    assert len(m["archipelago_job_loss"]) == 20
    assert value(m, "archipelago_jobs", state="running") == 20


def test_coordinators_in_one_process_keep_their_series_apart() -> None:
    first, second = Coordinator(), Coordinator()
    register(first, 2)
    register(second, 5)
    assert value(first.scrape(), "archipelago_workers", state="idle") == 2
    assert value(second.scrape(), "archipelago_workers", state="idle") == 5
    global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("archipelago_") for n in global_names)
    first.store.close()
    second.store.close()
