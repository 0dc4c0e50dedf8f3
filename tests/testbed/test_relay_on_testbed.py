"""A worker behind NAT on the WAN testbed: its host drops every inbound connection (as a
home router does), so a worker started there as usual is never reached and never planned;
the same host's worker started `--outbound-only` is reached through the coordinator's relay
and trains a stage of a two-stage job exactly like one process."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.localcluster import Proc, TestbedCluster, wait_for
from deploy.wan import Testbed, parse_spec
from deploy.wan.nat import drop_inbound, nat_unavailable
from tests.multiproc.test_service import reference_losses
from tests.testbed.support import assert_nothing_left, skip_unless_testbed_possible

pytestmark = pytest.mark.testbed
skip_unless_testbed_possible()
if nat_unavailable():
    pytest.skip(f"no NAT on the testbed: {nat_unavailable()}", allow_module_level=True)

SPEC = {
    "name": "archtest-relay",
    "subnet": "10.77.241.0/24",
    "regions": {"home": {"hosts": ["open1", "nat1"], "bandwidth": "200mbit"}},
}
STEPS = 4
# tests/multiproc/test_service.py's model, data and optimizer (its `reference_losses` is
# the one-process oracle), in two stages.
JOB = f"""
name: testbed-relay
model: {{zoo: gpt, args: {{layers: 2, d_model: 64, heads: 4, context: 32}}}}
data: {{corpus: stdlib-text, batch_size: 8, micro_batches: 2, max_bytes: 2000000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
parallel: {{planner: even, stages: 2}}
checkpoint: {{every: {STEPS}}}
"""
CONNECT_PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
    "except OSError as e:\n"
    "    print(type(e).__name__); sys.exit(1)\n"
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[TestbedCluster]:
    spec = parse_spec(SPEC)
    with Testbed(spec) as tb, TestbedCluster(tmp_path / "cluster", testbed=tb) as c:
        drop_inbound(tb.namespace("nat1"))
        yield c
    assert_nothing_left(spec.name)


def connects(tb: Testbed, src: str, address: str) -> bool:
    """Whether a TCP connection from host `src` to `address` is accepted."""
    host, _, port = address.rpartition(":")
    argv = tb.exec_args(src, [sys.executable, "-c", CONNECT_PROBE, host, port])
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def start_outbound_only(cluster: TestbedCluster, host: str, name: str) -> Proc:
    """A worker inside `host`'s namespace that serves on loopback only, reached through
    the coordinator's relay."""
    cluster.hosts_of[name] = host
    proc = cluster._spawn(name, [*cluster._worker_args(name, None), "--outbound-only"], host)
    cluster._wait_joined(proc, name)
    return proc


def test_a_worker_behind_nat_is_reached_through_the_relay_and_trains_like_one_process(
    cluster: TestbedCluster,
) -> None:
    tb = cluster.testbed
    cluster.start_coordinator()
    cluster.start_worker("open1")

    # Started as usual behind NAT, a worker joins (it reaches the coordinator) but no one
    # reaches it: it stays beside the relayed one below and is never planned.
    cluster.start_worker("nat1", "nat1-direct", wait=False)
    behind = wait_for(
        "the NAT-ed worker to register",
        lambda: next((w for w in cluster.workers_safe() if w.name == "nat1-direct"), None),
        60,
    )
    assert not connects(tb, "open1", behind.address), "nat1 takes inbound connections"
    assert connects(tb, "nat1", f"{tb.address('open1')}:7100"), "nat1 cannot reach out"

    relayed = start_outbound_only(cluster, "nat1", "nat1-relayed")
    try:
        worker = wait_for(
            "the relayed worker to be reachable",
            lambda: next(
                (w for w in cluster.workers_safe() if w.name == "nat1-relayed" and w.reachable),
                None,
            ),
            30,
        )
    except TimeoutError as e:
        raise TimeoutError(f"{e}: {cluster.workers_safe()}\n{cluster.logs()}") from None
    assert worker.relayed and not worker.excluded, worker
    # Its address is a port on the coordinator's host, which every peer can dial.
    assert worker.address.rpartition(":")[0] == str(tb.bridge_address)
    assert connects(tb, "open1", worker.address)

    job_id = cluster.submit(JOB)
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", 90)
    assert {s.worker_name for s in job.stages} == {"open1", "nat1-relayed"}
    assert relayed.alive
    behind = {w.name: w for w in cluster.workers_safe()}["nat1-direct"]
    assert not behind.reachable and not behind.relayed, behind
    losses = {m.step: m.loss for m in cluster.job(job_id, with_metrics=True).metrics}
    assert sorted(losses) == list(range(STEPS)), "a step has no loss"
    reference = reference_losses(STEPS)
    for step in range(STEPS):
        assert losses[step] == pytest.approx(reference[step], abs=1e-4), f"step {step}"
