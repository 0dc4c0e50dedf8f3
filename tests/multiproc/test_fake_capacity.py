"""Fake capacity does not win placement, on a real loopback cluster.

The attacks of issue 12, as a volunteer holding the join token would try them: 500
registrations claiming 1e9 GFLOP/s and 2^63 bytes of memory; a worker claiming to be very
fast at an address where nothing listens; a worker that reports a link of 79 Tbit/s. The
absurd claims are refused at registration, the unreachable and the lying workers are
excluded from planning for a back-off time (an event says so each time), and a job
submitted meanwhile completes on the honest workers.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from proto.cluster_tls import MemberTls
from proto.rpc import token_metadata
from tests.multiproc.cluster import (
    Cluster,
    coordinator_channel,
    free_port,
    joining_tls,
    signing_request_of,
)

pytestmark = pytest.mark.multiproc

STEPS = 12
SPEC = f"""
name: honest
model: {{zoo: gpt, args: {{layers: 2, d_model: 32, heads: 2, context: 16}}}}
data: {{corpus: stdlib-text, batch_size: 4, micro_batches: 2, max_bytes: 200000}}
optimizer: {{name: adamw, lr: 1.0e-3}}
steps: {STEPS}
checkpoint: {{every: {STEPS}}}
"""
TBIT_79 = 79e12 / 8  # bytes per second


class LinkLiar(worker_pb2_grpc.WorkerServicer):
    """A worker's service that echoes probes but reports every link at 79 Tbit/s."""

    def Probe(
        self, request: worker_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ProbeReply:
        return worker_pb2.ProbeReply(payload=b"\0" * min(request.reply_bytes, 8 << 20))

    def MeasureLinks(
        self, request: worker_pb2.MeasureLinksRequest, context: grpc.ServicerContext
    ) -> worker_pb2.MeasureLinksReply:
        return worker_pb2.MeasureLinksReply(
            links=[
                worker_pb2.LinkMeasurement(
                    worker_id=t.worker_id, bandwidth=TBIT_79, rtt_s=1e-5, bytes=1 << 20
                )
                for t in request.targets
            ]
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()


def register(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    token: str,
    name: str,
    address: str,
    *,
    gflops: float,
    memory_bytes: int,
    tls: MemberTls | None,
) -> coordinator_pb2.RegisterReply:
    """Register by hand, claiming what the caller says (over TLS with `tls`'s key, whose
    certificate it then holds)."""
    resources = coordinator_pb2.WorkerResources(
        gflops=gflops, memory_bytes=memory_bytes, device="cpu", threads=1
    )
    reply = stub.Register(
        coordinator_pb2.RegisterRequest(
            name=name, address=address, resources=resources, csr=signing_request_of(tls)
        ),
        metadata=token_metadata(token),
        timeout=10,
    )
    if tls is not None:
        tls.set_certificate(reply.certificate)
    return reply


def heart_beat(
    stub: coordinator_pb2_grpc.CoordinatorStub,
    token: str,
    reply: coordinator_pb2.RegisterReply,
    stop: threading.Event,
) -> None:
    """Keep a hand-registered worker alive (and idle) until `stop`."""
    metadata = list(token_metadata(token))
    credential = getattr(reply, "credential", "")
    if credential:  # a coordinator that issues each worker its own credential
        from proto.rpc import worker_metadata

        metadata += list(worker_metadata(reply.worker_id, credential))
    while not stop.wait(0.3):
        with contextlib.suppress(grpc.RpcError):
            stub.Heartbeat(
                coordinator_pb2.HeartbeatRequest(worker_id=reply.worker_id, state="idle"),
                metadata=tuple(metadata),
                timeout=5,
            )


def test_fake_capacity_does_not_win_placement_nor_stall_a_job(cluster: Cluster) -> None:
    cluster.start_coordinator()
    for name in ("w0", "w1"):
        cluster.start_worker(name)
    channel = coordinator_channel(cluster)
    stub = coordinator_pb2_grpc.CoordinatorStub(channel)
    stop = threading.Event()
    # The liar is a volunteer like any: it serves the cluster's mutual TLS with the
    # certificate its registration gets, so the coordinator reaches what it says.
    liar_tls = joining_tls(cluster)
    liar_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    try:
        # A "fast" worker at an address where nothing listens (a real worker process that
        # advertises a dead port), and one that reports every link at 79 Tbit/s.
        dead = f"127.0.0.1:{free_port()}"
        cluster.extra_worker_args = ["--gflops", "900000", "--advertise", dead]
        cluster.start_worker("ghost")
        cluster.extra_worker_args = []
        liar_port = (
            liar_server.add_insecure_port("127.0.0.1:0")
            if liar_tls is None
            else liar_server.add_secure_port("127.0.0.1:0", liar_tls.server_credentials())
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(LinkLiar(), liar_server)
        liar_server.start()
        reply = register(
            stub, cluster.token, "liar", f"127.0.0.1:{liar_port}", gflops=900000.0,
            memory_bytes=1 << 40, tls=liar_tls,
        )  # fmt: skip
        threading.Thread(
            target=heart_beat, args=(stub, cluster.token, reply, stop), daemon=True
        ).start()

        job_id = cluster.submit(SPEC)
        job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", 90)
        assert {s.worker_name for s in job.stages} <= {"w0", "w1"}

        client = cluster.client()
        try:
            events = client.events("")
            links = client.links()
        finally:
            client.close()
        excluded = {e.worker_name or e.text.split()[1]: e for e in events if e.kind == "excluded"}
        assert {"ghost", "liar"} <= excluded.keys(), [e.text for e in events]
        assert "unreachable" in excluded["ghost"].text or "start" in excluded["ghost"].text
        assert "implausible" in excluded["liar"].text
        # The 79 Tbit/s figure is nowhere believed.
        assert all(link.bandwidth < TBIT_79 / 100 for link in links)
        # 500 absurd claims: each refused (or rate-limited), naming what is wrong.
        refused: dict[grpc.StatusCode, int] = {}
        details = set()
        for i in range(500):
            try:
                register(
                    stub, cluster.token, f"fake{i}", f"127.0.0.1:{20000 + i}",
                    gflops=1e9, memory_bytes=2**63, tls=joining_tls(cluster),
                )  # fmt: skip
            except grpc.RpcError as e:
                refused[e.code()] = refused.get(e.code(), 0) + 1
                details.add(e.details())
        assert sum(refused.values()) == 500, refused
        assert set(refused) <= {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        }
        if grpc.StatusCode.INVALID_ARGUMENT in refused:
            assert any("claimed speed 1e+09 GFLOP/s is above" in d for d in details), details
        # Nobody new was let in: the workers are the ones there were.
        listed = {w.name: w for w in cluster.workers_safe()}
        assert set(listed) == {"w0", "w1", "ghost", "liar"}
        # The listing says who is left out and why, and plans no claim it does not believe.
        for name in ("ghost", "liar"):
            assert listed[name].excluded and listed[name].excluded_for_s > 0, listed[name]
            assert listed[name].planned_gflops < 900000.0
        assert not listed["w0"].excluded and listed["w0"].planned_gflops > 0
        shown = subprocess.run(
            [sys.executable, "-m", "archipelago.cli", "status", "--coordinator",
             cluster.address, "--operator-token", cluster.operator_token,
             "--ca", str(cluster.ca_file)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        status = shown.stdout
        assert "excluded from planning (for" in status and "implausible" in status, status
        assert "(claims 900000.0)" in status, status
    finally:
        stop.set()
        liar_server.stop(grace=0)
        channel.close()


def test_a_worker_nothing_answers_at_is_excluded_when_its_stage_cannot_start(
    cluster: Cluster,
) -> None:
    # No link survey, so nothing finds the dead address before a plan hands it a stage.
    cluster.extra_coordinator_args = ["--link-probes", "0"]
    cluster.start_coordinator()
    cluster.start_worker("w0")
    cluster.extra_worker_args = ["--gflops", "900000", "--advertise", f"127.0.0.1:{free_port()}"]
    cluster.start_worker("ghost")
    cluster.extra_worker_args = []
    job_id = cluster.submit(SPEC.replace("steps:", "parallel: {planner: even}\nsteps:"))
    job = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete", 90)
    assert [s.worker_name for s in job.stages] == ["w0"]
    client = cluster.client()
    try:
        events = client.events("")
        planned = [e.text for e in client.events(job_id) if e.kind == "planned"]
    finally:
        client.close()
    [excluded] = [e for e in events if e.kind == "excluded"]
    assert excluded.worker_name == "ghost" and "could not start a stage" in excluded.text
    assert "excluded for 30 s" in excluded.text
    # The plan that gave the ghost a stage broke at once; the next one left it out.
    assert "ghost" in planned[0] and "ghost" not in planned[-1]
