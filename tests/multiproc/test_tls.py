"""Mutual TLS, on by default, with the coordinator's own authority: a coordinator and two
workers that joined by the fingerprint it printed train a two-stage job (worker to worker
traffic included); callers that speak plain text, trust another authority, present no
certificate or one from another authority, or dial a worker under another's name are
refused; a worker pinned to another authority never joins."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from archipelago.client import ClientError, CoordinatorClient
from proto import worker_pb2, worker_pb2_grpc
from proto.certificates import CertificateAuthority, fingerprint, worker_name
from proto.cluster_tls import ClientTls, MemberTls
from proto.rpc import CHANNEL_OPTIONS, coordinator_metadata, open_blocking_channel
from tests.multiproc.cluster import Cluster, coordinator_credential, wait_for, worker_channel
from tests.multiproc.test_service import SPEC

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("tls-cluster"))  # TLS is the default
    try:
        c.start_coordinator()
        for i in range(2):
            c.start_worker(f"w{i}")
        yield c
    finally:
        c.close()


def test_two_stage_job_completes_over_mutual_tls(cluster: Cluster) -> None:
    assert not cluster.insecure and cluster.ca_fingerprint.startswith("sha256:")
    # The authority's certificate is where the coordinator wrote it, with that fingerprint.
    assert fingerprint(cluster.ca_file.read_bytes()) == cluster.ca_fingerprint
    job_id = cluster.submit(SPEC.format(steps=6, stages=2, every=3))
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert {s.worker_name for s in job.stages} == {"w0", "w1"}
    assert job.last_checkpoint == 6
    assert job.bytes_per_step > 0  # activations and gradients crossed between the workers
    metrics = cluster.job(job_id, with_metrics=True).metrics
    assert sorted(m.step for m in metrics) == list(range(6))


def test_plaintext_client_cannot_talk_to_the_coordinator(cluster: Cluster) -> None:
    plain = CoordinatorClient(cluster.address, operator_token=cluster.operator_token, timeout_s=5)
    try:
        with pytest.raises(ClientError, match="cannot reach"):
            plain.jobs()
    finally:
        plain.close()


def test_client_that_trusts_another_authority_is_refused(cluster: Cluster) -> None:
    stranger = CoordinatorClient(
        cluster.address,
        operator_token=cluster.operator_token,
        tls=ClientTls(CertificateAuthority.create().cert_pem),
        timeout_s=5,
    )
    try:
        with pytest.raises(ClientError, match="cannot reach"):
            stranger.workers()
    finally:
        stranger.close()
    trusting = cluster.client()
    try:
        assert {w.name for w in trusting.workers()} == {"w0", "w1"}
    finally:
        trusting.close()


def _status(channel: grpc.Channel, credential: str) -> worker_pb2.WorkerStatus:
    """A worker's Status, asked as its coordinator (with `credential`)."""
    try:
        return worker_pb2_grpc.WorkerStub(channel).Status(
            worker_pb2.StatusRequest(), metadata=coordinator_metadata(credential), timeout=5
        )
    finally:
        channel.close()


def _refused_handshake(channel: grpc.Channel, credential: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        _status(channel, credential)
    # The handshake fails, so no call reaches the worker's service at all.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()


def test_workers_serve_only_mutual_tls_with_the_clusters_authority(cluster: Cluster) -> None:
    workers = {w.name: w for w in cluster.workers_safe()}
    assert set(workers) == {"w0", "w1"}
    authority = ClientTls(cluster.ca_file.read_bytes())
    other = CertificateAuthority.create()
    for w in workers.values():
        credential = coordinator_credential(cluster, w.worker_id)
        name = worker_name(w.worker_id)
        # As the coordinator (its control identity from the cluster's authority): answered.
        assert _status(worker_channel(cluster, w.address, w.worker_id), credential).name == w.name
        # Plain text; TLS without a client certificate; a certificate of another authority,
        # even one named like a worker or the coordinator: all refused in the handshake.
        _refused_handshake(grpc.insecure_channel(w.address, options=CHANNEL_OPTIONS), credential)
        _refused_handshake(open_blocking_channel(w.address, authority, name=name), credential)
        for as_name in (worker_name("impostor"), "control.coordinator.archipelago"):
            forged = MemberTls.for_coordinator(other, as_name)
            forged.ca_pem = authority.ca_pem  # it trusts the real authority, to get that far
            _refused_handshake(open_blocking_channel(w.address, forged, name=name), credential)
    # Dialling one worker's address while expecting another's name: the client refuses.
    w0, w1 = workers["w0"], workers["w1"]
    _refused_handshake(
        worker_channel(cluster, w0.address, w1.worker_id),
        coordinator_credential(cluster, w0.worker_id),
    )


def test_a_worker_pinned_to_another_authority_never_joins(cluster: Cluster) -> None:
    other = CertificateAuthority.create().fingerprint
    args = cluster._worker_args("pinned-elsewhere", None)
    args[args.index("--ca-fingerprint") + 1] = other
    run = subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster._env(),
    )
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("archipelago: error:")]
    assert len(lines) == 1, run.stderr
    assert f"presents certificate {cluster.ca_fingerprint}, not {other}" in lines[0]
    assert "pinned-elsewhere" not in {w.name for w in cluster.workers_safe()}
    wait_for("the cluster to stay as it was", lambda: len(cluster.workers_safe()) == 2, 5)
