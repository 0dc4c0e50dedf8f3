"""One token, no roles - no more: an attacker holding the join token (and a worker
credential of its own) tries, on a real loopback cluster, every attack the join token
alone once allowed. Each is refused in the attacker's way (the status and a message that
names what is wrong), the store is unchanged, and the job that runs meanwhile completes
with the losses of an undisturbed run.

One cluster, one small job: every attack runs while its stages train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from coordinator.store import open_store
from proto import coordinator_pb2, coordinator_pb2_grpc, worker_pb2, worker_pb2_grpc
from proto.certificates import worker_name
from proto.rpc import (
    CHANNEL_OPTIONS,
    coordinator_metadata,
    open_blocking_channel,
    operator_metadata,
    token_metadata,
    worker_metadata,
)
from tests.multiproc.cluster import (
    Cluster,
    coordinator_credential,
    joining_tls,
    signing_request_of,
    wait_for,
)
from tests.multiproc.test_service import SPEC, assert_losses_match_reference

pytestmark = pytest.mark.multiproc

STEPS = 60
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def refused(
    code: grpc.StatusCode, match: str, rpc: Callable[..., Any], *args: Any, **kw: Any
) -> None:
    """`rpc(*args, **kw)` ends with `code`, and its message says `match`."""
    with pytest.raises(grpc.RpcError) as caught:
        rpc(*args, timeout=10, **kw)
    err: Any = caught.value
    assert err.code() == code, (match, err.code(), err.details())
    assert match in (err.details() or ""), (match, err.details())


class Attacker:
    """Stubs to the coordinator and to the workers, as a stranger calls them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.channels: dict[str, grpc.Channel] = {}
        self.join = token_metadata(cluster.token)
        # Over the cluster's TLS, as any volunteer: it trusts the authority and, once
        # registered, holds a certificate of its own for calling workers.
        self.tls = joining_tls(cluster)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self._channel(cluster.address))
        # A worker of the attacker's own (at an address where nothing listens): a real
        # credential, to try outside its worker's role.
        reply = self.coordinator.Register(
            coordinator_pb2.RegisterRequest(
                name="attacker", address="127.0.0.1:9", csr=signing_request_of(self.tls)
            ),
            metadata=self.join,
            timeout=10,
        )
        self.worker_id = reply.worker_id
        self.own = worker_metadata(reply.worker_id, reply.credential)
        if self.tls is not None:
            self.tls.set_certificate(reply.certificate)

    def _channel(self, address: str) -> grpc.Channel:
        if address not in self.channels:
            if self.tls is None:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
            elif address == self.cluster.address:
                channel = open_blocking_channel(address, self.tls)
            else:
                (there,) = [w for w in self.cluster.workers_safe() if w.address == address]
                channel = open_blocking_channel(
                    address, self.tls, name=worker_name(there.worker_id)
                )
            self.channels[address] = channel
        return self.channels[address]

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        return worker_pb2_grpc.WorkerStub(self._channel(address))

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def store_snapshot(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """What an attack must not change: every worker's record, the job's plan and its state."""
    store = open_store(cluster.store)
    try:
        job = store.get_job(job_id) or {}
        return {
            "workers": sorted(store.list_workers(), key=lambda r: r["worker_id"]),
            "plan": store.get_plan(job_id),
            "job": {k: job.get(k) for k in ("state", "epoch", "error", "recoveries")},
            "checkpoint": store.latest_checkpoint(job_id),
        }
    finally:
        store.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Declared speeds: no worker spends its start measuring one.
    c = Cluster(tmp_path_factory.mktemp("roles") / "cluster", extra_worker_args=["--gflops", "5"])
    try:
        c.start_coordinator()
        for name in ("w0", "w1"):
            c.start_worker(name)
        yield c
    finally:
        c.close()


def test_a_join_token_holder_can_neither_steer_workers_nor_speak_for_them(
    cluster: Cluster,
) -> None:
    workers = {w.name: w for w in cluster.workers_safe()}
    a = Attacker(cluster)
    join, own = a.join, a.own
    try:
        # An idle worker takes no stage from a token holder (nor from a peer).
        idle = a.worker(workers["w0"].address)
        evil = [worker_pb2.LoadStagePart(assignment=worker_pb2.StageAssignment(job_id="evil"))]
        loads = "LoadStage is the coordinator's"
        refused(DENIED, loads, idle.LoadStage, iter(evil), metadata=join)
        refused(UNAUTHENTICATED, "LoadStage", idle.LoadStage, iter(evil), metadata=own)
        credential = coordinator_credential(cluster, workers["w0"].worker_id)
        as_coordinator = coordinator_metadata(credential)
        status = idle.Status(worker_pb2.StatusRequest(), metadata=as_coordinator, timeout=10)
        assert (status.name, status.job_id) == ("w0", "")

        job_id = cluster.submit(SPEC.format(steps=STEPS, stages=2, every=30))
        running = cluster.wait_job(
            job_id, lambda j: j.state == "running" and j.steps_done >= 2, "the job to run"
        )
        stages = {s.stage: s for s in running.stages}
        # The attacker's own worker never heart-beats: once the coordinator has declared it
        # lost, as it must, nothing but an attack could change the store below.
        wait_for(
            "the attacker's silent worker to be declared lost",
            lambda: any(w.name == "attacker" and w.state == "lost" for w in cluster.workers_safe()),
            30,
        )
        before = store_snapshot(cluster, job_id)

        # -- the worker API, as if the attacker were the coordinator ---------------------------
        head = a.worker(stages[0].address)
        stop = worker_pb2.JobControl(job_id=job_id, epoch=running.epoch)
        refused(DENIED, "StopJob is the coordinator's to call", head.StopJob, stop, metadata=join)
        refused(UNAUTHENTICATED, "missing coordinator credential", head.StopJob, stop, metadata=own)
        forged = coordinator_metadata("a-guessed-coordinator-credential")
        wrong_one = "wrong coordinator credential"
        refused(UNAUTHENTICATED, wrong_one, head.StopJob, stop, metadata=forged)
        refused(DENIED, loads, head.LoadStage, iter(evil), metadata=join)
        refused(DENIED, "join token", head.Status, worker_pb2.StatusRequest(), metadata=join)
        measure = worker_pb2.MeasureLinksRequest()
        refused(DENIED, "join token", head.MeasureLinks, measure, metadata=join)
        # A spot check's evidence (a stage's inputs or parameters) is the coordinator's alone.
        spot = worker_pb2.SpotRequest(job_id=job_id, epoch=running.epoch, step=1, params=True)

        def evidence(request: worker_pb2.SpotRequest, **kw: Any) -> list[Any]:
            return list(head.SpotEvidence(request, **kw))

        refused(DENIED, "SpotEvidence is the coordinator's to call", evidence, spot, metadata=join)
        refused(UNAUTHENTICATED, "SpotEvidence: missing", evidence, spot, metadata=own)
        refused(UNAUTHENTICATED, wrong_one, evidence, spot, metadata=forged)
        refused(DENIED, "probe ticket", head.Probe, worker_pb2.ProbeRequest(), metadata=join)
        # A peer transfer claiming stage 0, without the secret stages 0 and 1 share.
        tail = a.worker(stages[1].address)
        transfer = worker_pb2.TransferHeader(
            job_id=job_id, epoch=running.epoch, pair_secret="x" * 43, step=3, src_stage=0
        )
        parts = [worker_pb2.TransferPart(header=transfer)]
        refused(
            DENIED,
            "wrong stage-pair secret for stage 0 -> 1",
            tail.Activations,
            iter(parts),
            metadata=join,
        )

        # -- the coordinator API, as if the attacker were a worker -----------------------------
        c = a.coordinator

        def finished(worker_id: str, stage: int) -> coordinator_pb2.ProgressReport:
            return coordinator_pb2.ProgressReport(
                worker_id=worker_id,
                job_id=job_id,
                epoch=running.epoch,
                stage=stage,
                step=STEPS - 1,
                finished=True,
            )

        ghost_id = worker_metadata("no-such-worker", "x" * 43)
        for stage in (0, 1):
            ghost = finished("no-such-worker", stage)
            needs = "ReportProgress needs a worker's credential"
            refused(DENIED, needs, c.ReportProgress, ghost, metadata=join)
            refused(UNAUTHENTICATED, "unknown id", c.ReportProgress, ghost, metadata=ghost_id)
            refused(DENIED, "names worker 'no-such-worker'", c.ReportProgress, ghost, metadata=own)
            # The attacker's own credential, for another worker's stage (in its name or its own).
            theirs = finished(stages[stage].worker_id, stage)
            sent = f"but worker {a.worker_id} sent it"
            refused(DENIED, sent, c.ReportProgress, theirs, metadata=own)
            mine = finished(a.worker_id, stage)
            not_its = f"worker {a.worker_id} does not run stage {stage}"
            refused(DENIED, not_its, c.ReportProgress, mine, metadata=own)
        # An empty checkpoint (no tensors) of stage 0 at step 40.
        header = coordinator_pb2.CheckpointHeader(
            worker_id=a.worker_id,
            job_id=job_id,
            epoch=running.epoch,
            stage=0,
            num_stages=2,
            step=40,
        )
        empty = [coordinator_pb2.CheckpointPart(header=header)]
        needs = "UploadCheckpoint needs a worker's credential"
        refused(DENIED, needs, c.UploadCheckpoint, iter(empty), metadata=join)
        refused(DENIED, "its checkpoint is refused", c.UploadCheckpoint, iter(empty), metadata=own)
        # Another worker's identity: re-registering its id elsewhere, leaving for it.
        w0 = stages[0].worker_id
        theft = coordinator_pb2.RegisterRequest(
            name="w0", address="127.0.0.1:9", worker_id=w0, csr=signing_request_of(a.tls)
        )
        refused(DENIED, "registered already", c.Register, theft, metadata=join)
        guessed = join + worker_metadata(w0, "x" * 43)
        refused(UNAUTHENTICATED, "wrong credential", c.Register, theft, metadata=guessed)
        leave = coordinator_pb2.LeaveRequest(worker_id=stages[1].worker_id)
        refused(DENIED, "Leave needs a worker's credential", c.Leave, leave, metadata=join)
        refused(DENIED, f"the caller is worker {a.worker_id}", c.Leave, leave, metadata=own)
        beat = coordinator_pb2.HeartbeatRequest(worker_id=w0)
        refused(DENIED, "the caller is", c.Heartbeat, beat, metadata=own)

        # -- the operator's API ----------------------------------------------------------------
        spec = coordinator_pb2.SubmitJobRequest(spec_yaml=SPEC.format(steps=5, stages=1, every=5))
        get = coordinator_pb2.JobRequest(job_id=job_id)
        for metadata in (join, own):
            refused(
                DENIED, "SubmitJob needs the operator token", c.SubmitJob, spec, metadata=metadata
            )
            refused(DENIED, "GetJob needs the operator token", c.GetJob, get, metadata=metadata)
            refused(
                DENIED, "CancelJob needs the operator token", c.CancelJob, get, metadata=metadata
            )
        wrong = operator_metadata("a-guessed-operator-token")
        refused(UNAUTHENTICATED, "wrong operator token", c.GetJob, get, metadata=wrong)

        # Nothing moved: the store, the job (its first plan, still running), the workers.
        assert store_snapshot(cluster, job_id) == before
        job = cluster.job(job_id)
        assert (job.state, job.epoch, job.recoveries) == ("running", running.epoch, 0), job
        listed = {w.worker_id: w for w in cluster.workers_safe()}
        assert listed[w0].address == stages[0].address
        assert listed[stages[1].worker_id].state == "busy"
    finally:
        a.close()

    done = cluster.wait_job(job_id, lambda j: j.state == "completed", "the job to complete")
    assert (done.epoch, done.recoveries, done.last_checkpoint) == (running.epoch, 0, STEPS)
    assert_losses_match_reference(cluster, job_id, STEPS)
