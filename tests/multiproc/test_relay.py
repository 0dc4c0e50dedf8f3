"""A worker started `--outbound-only` on loopback: it is reached through the coordinator's
relay at a port of the coordinator's; when the coordinator restarts (the stream drops) the
worker opens a new stream and comes back under the same id at the new port, the old one
closed; and with relaying off, such a worker is refused by name."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from archipelago.client import WorkerView
from archipelago.localcluster import Cluster, wait_for

pytestmark = pytest.mark.multiproc


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster") as c:
        yield c


def port_open(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def relayed_worker(cluster: Cluster, name: str, not_at: str = "") -> WorkerView | None:
    return next(
        (
            w
            for w in cluster.workers_safe()
            if w.name == name and w.relayed and w.reachable and w.address != not_at
        ),
        None,
    )


def test_an_outbound_only_worker_comes_back_through_a_restarted_coordinators_relay(
    cluster: Cluster,
) -> None:
    cluster.start_coordinator()
    cluster.extra_worker_args = ["--outbound-only"]
    proc = cluster.start_worker("natted")
    first = wait_for("the relayed worker", lambda: relayed_worker(cluster, "natted"), 30)
    host = first.address.rpartition(":")[0]
    assert host == "127.0.0.1" and first.address != cluster.address
    assert port_open(first.address)

    cluster.kill(cluster.coordinator)  # type: ignore[arg-type]
    assert not port_open(first.address), "the relay port outlived its coordinator"
    cluster.start_coordinator("coordinator-again")
    try:
        again = wait_for(
            "the worker back at a new relay port",
            lambda: relayed_worker(cluster, "natted", not_at=first.address),
            60,
        )
    except TimeoutError as e:
        raise TimeoutError(f"{e}\n{cluster.logs()}") from None
    assert again.worker_id == first.worker_id
    assert port_open(again.address) and not port_open(first.address)
    assert proc.alive
    assert "relay stream to" in proc.tail(200) and "reconnecting" in proc.tail(200)


def test_a_coordinator_that_relays_no_one_refuses_an_outbound_only_worker_by_name(
    cluster: Cluster,
) -> None:
    cluster.extra_coordinator_args = ["--max-relayed-workers", "0"]
    cluster.start_coordinator()
    cluster.extra_worker_args = ["--outbound-only"]
    proc = cluster.start_worker("natted", wait=False)
    assert proc.popen.wait(timeout=60) == 2
    assert "relays no workers (--max-relayed-workers 0)" in proc.tail()
