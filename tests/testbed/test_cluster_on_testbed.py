"""The service on the WAN testbed: a coordinator on the bridge and a worker in each host's
namespace. The links the coordinator measures on its own separate the regions as the
testbed shapes them, and a job pipelined over both regions trains exactly like one
process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.client import LinkView
from archipelago.localcluster import TestbedCluster, wait_for
from deploy.wan import Testbed, parse_spec
from tests.multiproc.test_service import reference_losses
from tests.testbed.support import assert_nothing_left, skip_unless_testbed_possible

pytestmark = pytest.mark.testbed
skip_unless_testbed_possible()

INTER_BPS = 20e6
SPEC = {
    "name": "archtest-cluster",
    "subnet": "10.77.249.0/24",
    "regions": {
        "eu": {"hosts": ["eu1", "eu2"], "bandwidth": "200mbit"},
        "us": {"hosts": ["us1", "us2"], "bandwidth": "200mbit"},
    },
    "links": [{"between": ["eu", "us"], "bandwidth": "20mbit"}],
}
# Interleaved, so that registration order says nothing about regions.
JOIN_ORDER = ("eu1", "us1", "eu2", "us2")
INTER_TOLERANCE = 0.25
MIN_REGION_SEPARATION = 3.0

# The model, data and optimizer of tests/multiproc/test_service.py's SPEC, whose
# `reference_losses` is the one-process oracle; only the planner is pinned here.
STEPS = 6
JOB = f"""
name: testbed-e2e
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
parallel: {{planner: even, stages: 4}}
checkpoint: {{every: {STEPS}}}
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[TestbedCluster]:
    spec = parse_spec(SPEC)
    with Testbed(spec) as tb, TestbedCluster(tmp_path / "cluster", testbed=tb) as c:
        yield c
    assert_nothing_left(spec.name)


def links_of(cluster: TestbedCluster) -> list[LinkView]:
    client = cluster.client()
    try:
        return client.links()
    finally:
        client.close()


def link_table(cluster: TestbedCluster, links: list[LinkView]) -> str:
    tb = cluster.testbed
    rows = [("src", "dst", "path", "spec", "measured", "RTT")]
    for x in sorted(links, key=lambda x: (x.src_name, x.dst_name)):
        spec_bps = tb.spec.path(x.src_name, x.dst_name).bandwidth_bps
        inside = tb.region_of(x.src_name) == tb.region_of(x.dst_name)
        rows.append(
            (
                x.src_name,
                x.dst_name,
                "intra" if inside else "inter",
                f"{spec_bps / 1e6:.0f} Mbit/s",
                f"{x.bandwidth * 8 / 1e6:.2f} Mbit/s",
                f"{x.rtt_s * 1e3:.2f} ms",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def test_measured_links_separate_the_regions_and_a_job_trains_like_one_process(
    cluster: TestbedCluster,
) -> None:
    tb = cluster.testbed
    cluster.start_coordinator()
    for host in JOIN_ORDER:
        cluster.start_worker(host)
    workers = {w.name: w for w in cluster.workers_safe()}
    for host in JOIN_ORDER:
        assert workers[host].address == f"{tb.address(host)}:7100"

    def all_measured() -> list[LinkView] | None:
        links = [x for x in links_of(cluster) if x.bandwidth > 0]
        return links if len(links) == 12 else None

    try:
        links = wait_for("all 12 directed links to be measured", all_measured, 60, interval=0.5)
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{cluster.logs()}") from None
    table = link_table(cluster, links)
    print(f"\n{tb.name}: links measured by the coordinator\n{table}")

    pairs = {(x.src_name, x.dst_name) for x in links}
    assert pairs == {(a, b) for a in JOIN_ORDER for b in JOIN_ORDER if a != b}
    intra = [x for x in links if tb.region_of(x.src_name) == tb.region_of(x.dst_name)]
    inter = [x for x in links if x not in intra]
    assert len(intra) == 4 and len(inter) == 8
    slowest_intra = min(x.bandwidth for x in intra)
    fastest_inter = max(x.bandwidth for x in inter)
    assert slowest_intra >= MIN_REGION_SEPARATION * fastest_inter, table
    for x in inter:
        assert abs(x.bandwidth * 8 / INTER_BPS - 1) <= INTER_TOLERANCE, table

    job_id = cluster.submit(JOB)
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", 60)
    assert len(job.stages) == 4
    assert {s.worker_name for s in job.stages} == set(JOIN_ORDER)
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    assert sorted(losses) == list(range(STEPS)), "a step has no loss"
    reference = reference_losses(STEPS)
    for step in range(STEPS):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"
