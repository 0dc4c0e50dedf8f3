"""Link measurements on a real cluster: idle workers are probed pair by pair, the figures
are served to `archipelago status --links`, survive a coordinator restart, and a worker
refuses to probe outside the networks its volunteer allowed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from archipelago.client import LinkView
from proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from proto.rpc import coordinator_metadata, token_metadata
from tests.multiproc.cluster import (
    OPERATOR_TOKEN,
    TOKEN,
    Cluster,
    coordinator_channel,
    coordinator_credential,
    probe_ticket,
    wait_for,
    worker_channel,
)

pytestmark = pytest.mark.multiproc


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def links_of(cluster: Cluster) -> list[LinkView]:
    client = cluster.client()
    try:
        return client.links()
    finally:
        client.close()


def test_idle_workers_get_every_directed_link_measured(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for i in range(3):
        cluster.start_worker(f"w{i}")
    links = wait_for(
        "6 directed links to be measured",
        lambda: found if len(found := links_of(cluster)) == 6 else None,
        60,
    )
    pairs = {(x.src_name, x.dst_name) for x in links}
    assert pairs == {(a, b) for a in ("w0", "w1", "w2") for b in ("w0", "w1", "w2") if a != b}
    for x in links:
        # Loopback moves far more than 10 Mbit/s and answers well inside a second.
        assert x.bandwidth > 10e6 / 8, x
        assert 0 < x.rtt_s < 1.0, x

    command = [
        "status",
        "--links",
        "--coordinator",
        cluster.address,
        "--operator-token",
        OPERATOR_TOKEN,
        "--ca",
        str(cluster.ca_file),
    ]
    out = subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert {(r[0], r[1]) for r in rows} == pairs
    assert all(float(r[2]) > 10 for r in rows)  # Mbit/s column

    # A restarted coordinator knows the figures at once, from its store.
    assert cluster.coordinator is not None
    cluster.kill(cluster.coordinator)
    cluster.start_coordinator("coordinator-2")
    assert {(x.src_name, x.dst_name) for x in links_of(cluster)} == pairs


def test_worker_refuses_to_probe_outside_its_networks(cluster: Cluster) -> None:
    cluster.start_coordinator()
    cluster.start_worker("w0")
    (worker,) = cluster.workers_safe()
    channel = worker_channel(cluster, worker.address, worker.worker_id)
    stub = worker_pb2_grpc.WorkerStub(channel)
    as_coordinator = coordinator_metadata(coordinator_credential(cluster, worker.worker_id))
    try:
        # 192.0.2.0/24 is reserved for documentation: nothing is there, and the worker
        # (allowed only 127.0.0.0/8 by the cluster) must refuse before sending anything.
        request = worker_pb2.MeasureLinksRequest(
            targets=[worker_pb2.LinkTarget(worker_id="x", address="192.0.2.1:7100")],
            max_bytes=1 << 20,
            target_seconds=0.2,
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.MeasureLinks(request, metadata=as_coordinator, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "--probe-networks" in (info.value.details() or "")
        # A name is never looked up either.
        request.targets[0].address = "localhost:7100"
        with pytest.raises(grpc.RpcError) as info:
            stub.MeasureLinks(request, metadata=as_coordinator, timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        request.targets[0].address = worker.address
        request.max_bytes = 1 << 40
        with pytest.raises(grpc.RpcError) as info:
            stub.MeasureLinks(request, metadata=as_coordinator, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_bytes" in (info.value.details() or "")
        # Within bounds, a worker measures even its link to itself (named as the worker
        # there: over TLS the probe verifies who answers).
        request.max_bytes = 1 << 20
        request.targets[0].worker_id = worker.worker_id
        request.targets[0].ticket = probe_ticket(cluster, worker.worker_id, worker.worker_id)
        reply = stub.MeasureLinks(request, metadata=as_coordinator, timeout=30)
        assert reply.links[0].bandwidth > 0 and not reply.links[0].error
    finally:
        channel.close()


def test_coordinator_refuses_workers_outside_its_networks(cluster: Cluster) -> None:
    cluster.start_coordinator()  # the cluster's coordinator accepts 127.0.0.0/8 only
    channel = coordinator_channel(cluster)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    try:
        for address in ("192.0.2.1:7100", "worker.example:7100"):
            request = coordinator_pb2.RegisterRequest(name="far", address=address)
            with pytest.raises(grpc.RpcError) as info:
                stub.Register(request, metadata=token_metadata(TOKEN), timeout=10)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--worker-networks" in (info.value.details() or "")
    finally:
        channel.close()
    assert cluster.workers_safe() == []
