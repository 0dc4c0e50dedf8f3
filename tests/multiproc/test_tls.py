"""The service over TLS: a coordinator and two workers presenting a self-signed certificate
train a two-stage job (worker to worker traffic included), and callers that do not speak
TLS, or do not trust the certificate, are refused."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from archipelago.client import ClientError, CoordinatorClient
from proto import worker_pb2, worker_pb2_grpc
from proto.rpc import TlsConfig, coordinator_metadata, open_blocking_channel
from tests.multiproc.cluster import Cluster, coordinator_credential, wait_for
from tests.multiproc.test_service import SPEC

pytestmark = pytest.mark.multiproc


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for 127.0.0.1 and localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the `openssl` command is needed to make the TLS test's certificate")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@dataclass
class TlsCluster(Cluster):
    """A `Cluster` whose own client (used to wait for workers and jobs) speaks TLS."""

    tls: TlsConfig | None = None

    def client(self, token: str | None = None) -> CoordinatorClient:
        if token is not None:
            return CoordinatorClient(self.address, token=token, tls=self.tls, timeout_s=30)
        return CoordinatorClient(
            self.address, operator_token=self.operator_token, tls=self.tls, timeout_s=30
        )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"), "archipelago-test")


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path]
) -> Iterator[TlsCluster]:
    cert, key = certificate
    serve = ["--tls-cert", str(cert), "--tls-key", str(key)]
    c = TlsCluster(
        tmp_path_factory.mktemp("tls-cluster"),
        extra_coordinator_args=serve,
        extra_worker_args=[*serve, "--tls-ca", str(cert)],
        tls=TlsConfig(ca=cert),
    )
    try:
        c.start_coordinator()
        workers = [c.start_worker(f"w{i}", wait=False) for i in range(2)]
        wait_for(
            "both workers to join over TLS",
            lambda: (
                any(not w.alive for w in workers)
                or {w.name for w in c.workers_safe() if w.state == "idle"} == {"w0", "w1"}
            ),
            90,
        )
        assert all(w.alive for w in workers), c.logs()
        yield c
    finally:
        c.close()


def test_two_stage_job_completes_over_tls(cluster: TlsCluster) -> None:
    job_id = cluster.submit(SPEC.format(steps=6, stages=2, every=3))
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert {s.worker_name for s in job.stages} == {"w0", "w1"}
    assert job.last_checkpoint == 6
    assert job.bytes_per_step > 0  # activations and gradients crossed between the workers
    metrics = cluster.job(job_id, with_metrics=True).metrics
    assert sorted(m.step for m in metrics) == list(range(6))


def test_plaintext_client_cannot_talk_to_the_tls_coordinator(cluster: TlsCluster) -> None:
    plain = CoordinatorClient(cluster.address, operator_token=cluster.operator_token, timeout_s=5)
    try:
        with pytest.raises(ClientError, match="cannot reach"):
            plain.jobs()
    finally:
        plain.close()


def test_client_that_does_not_trust_the_certificate_is_refused(
    cluster: TlsCluster, tmp_path: Path
) -> None:
    other_ca, _ = make_certificate(tmp_path, "some-other-ca")
    stranger = CoordinatorClient(
        cluster.address,
        operator_token=cluster.operator_token,
        tls=TlsConfig(ca=other_ca),
        timeout_s=5,
    )
    try:
        with pytest.raises(ClientError):
            stranger.workers()
    finally:
        stranger.close()
    trusting = cluster.client()
    try:
        assert {w.name for w in trusting.workers()} == {"w0", "w1"}
    finally:
        trusting.close()


def _worker_status(address: str, credential: str, tls: TlsConfig | None) -> worker_pb2.WorkerStatus:
    """The worker's Status, asked as its coordinator (with `credential`)."""
    channel = open_blocking_channel(address, tls)
    try:
        return worker_pb2_grpc.WorkerStub(channel).Status(
            worker_pb2.StatusRequest(), metadata=coordinator_metadata(credential), timeout=5
        )
    finally:
        channel.close()


def test_workers_serve_only_tls(cluster: TlsCluster, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    workers = cluster.workers_safe()
    assert len(workers) == 2
    for worker in workers:
        credential = coordinator_credential(cluster, worker.worker_id)
        with pytest.raises(grpc.RpcError) as plaintext:
            _worker_status(worker.address, credential, None)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE, worker.name
        tls = TlsConfig(ca=cert)
        assert _worker_status(worker.address, credential, tls).name == worker.name
