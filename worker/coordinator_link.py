"""A worker's link to the coordinator: join, heart-beat, report, upload checkpoints.

Every call after the first registration carries this worker's id and credential
(`worker.credentials`); a registration also carries the join token, and under a known id
the credential that proves the id is this worker's. Each registration's reply replaces the
credentials (the node checks the coordinator's calls with them at once). If a registration
under its old id is refused (the coordinator knows the id but not this credential: a reply
lost on the way), the worker joins afresh under a new id.

The coordinator may restart at any time. Registration is retried until it answers; a
heartbeat that finds the coordinator does not know this worker registers again (keeping
the worker's id); progress reports queue up and are delivered in order once it is back, so
a job's steps keep counting while the coordinator is away. Every retry waits by one
`RetryPolicy` (`COORDINATOR_RETRY`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from functools import partial

import grpc
import torch

from proto.certificates import MEMBER_DAYS, CertificateError, certificate_name, worker_name
from proto.cluster_tls import ClientTls, MemberTls
from proto.retry import RetryPolicy, retry
from proto.rpc import Metadata, open_channel, token_metadata
from worker.coordinator_serde import (
    ProgressReport,
    checkpoint_parts,
    coordinator_stub,
    heartbeat_answer_from_pb,
    heartbeat_request_pb,
    leave_request_pb,
    progress_report_pb,
    register_request_pb,
    registration_from_pb,
)
from worker.credentials import NodeCredentials
from worker.resources import Resources
from worker.stage_job import StepReport
from worker.stage_plan import StagePlan

log = logging.getLogger("archipelago.worker")

# A coordinator that is away is asked again every half second, for as long as it takes: the
# worker has nothing better to do, and comes back as soon as the coordinator does.
COORDINATOR_RETRY = RetryPolicy(attempts=None, first_delay_s=0.5, backoff=1.0, max_delay_s=0.5)
# The coordinator's answers that are final: it does not take this worker...
REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
# ...or has moved on from what a report or checkpoint is about (a job, an epoch), or no
# longer has this worker on that stage (PERMISSION_DENIED: the report is not its to make).
OUTDATED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
# Registration is retried on anything but a refusal or a bad request; a report or a
# checkpoint on anything but being outdated (UNAUTHENTICATED too: the heartbeat loop
# registers again, and the next try carries the new credential).
REGISTER_RETRIED = frozenset(grpc.StatusCode) - REFUSED - {grpc.StatusCode.INVALID_ARGUMENT}
DELIVERY_RETRIED = frozenset(grpc.StatusCode) - OUTDATED


# An idle worker registers again (for a fresh certificate) once its certificate is this old.
CERTIFICATE_RENEW_S = MEMBER_DAYS * 86400 / 2


class RefusedError(Exception):
    """The coordinator refused this worker (a wrong join token)."""


class CoordinatorLink:
    """Everything a worker says to the coordinator."""

    def __init__(
        self,
        address: str,
        *,
        token: str,
        tls: ClientTls | None,
        name: str,
        resources: Resources,
        retry_policy: RetryPolicy = COORDINATOR_RETRY,
        credentials: NodeCredentials | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.name = name
        self.resources = resources
        self.retry_policy = retry_policy
        self.advertise = ""
        self.worker_id = ""
        self.heartbeat_s = 1.0
        # Over TLS this worker's own identity too: registration certifies its key.
        self.tls = tls
        self._channel = open_channel(address, tls)
        self._stub = coordinator_stub(self._channel)
        self._token_metadata = token_metadata(token)
        # This worker's id and secrets (shared with the node, which checks calls with them).
        self.credentials = credentials or NodeCredentials()
        # Reports waiting for the coordinator, each with the worker id it was made under.
        self._reports: collections.deque[tuple[str, StepReport]] = collections.deque()
        self._report_ready = asyncio.Event()
        self._unreachable_logged = False
        # When this worker's certificate was signed (monotonic s; None: none yet). An idle
        # worker registers again once half its life is gone, so it never runs out.
        self.certified_at: float | None = None
        # Set once this worker has asked to leave: a coordinator that then no longer
        # knows it has let it go, and must not get it back as a fresh volunteer.
        self.leaving = False

    # -- joining ---------------------------------------------------------------------------

    @property
    def _metadata(self) -> Metadata:
        """What proves this worker on a call (its latest credential: read at each try)."""
        return self.credentials.metadata()

    async def register(self) -> str:
        """Register (again), retrying until the coordinator answers; returns the worker id."""
        member = self.tls if isinstance(self.tls, MemberTls) else None
        request = register_request_pb(
            name=self.name,
            address=self.advertise,
            worker_id=self.worker_id,
            resources=self.resources,
            csr=member.signing_request() if member is not None else b"",
        )
        try:
            reply = await retry(
                lambda: self._stub.Register(
                    request, metadata=self._token_metadata + self._metadata, timeout=10
                ),
                self.retry_policy,
                retry_on=REGISTER_RETRIED,
                on_retry=self._log_unreachable,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() in REFUSED and self.worker_id and self.credentials.credential:
                log.warning(
                    "the coordinator refused this worker's id %s (%s); joining anew",
                    self.worker_id,
                    e.details(),
                )
                self.worker_id = ""
                self.credentials.admit("", "", "")
                return await self.register()
            if e.code() in REFUSED:
                raise RefusedError(f"the coordinator refused this worker: {e.details()}") from None
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise RefusedError(f"the coordinator refused to register: {e.details()}") from None
            raise
        registration = registration_from_pb(reply)
        if member is not None:
            self._take_certificate(member, registration.worker_id, registration.certificate)
        self._unreachable_logged = False
        self.credentials.admit(
            registration.worker_id, registration.credential, registration.coordinator_credential
        )
        self.worker_id = registration.worker_id
        self.heartbeat_s = registration.heartbeat_s
        log.info("registered with %s as %s (%s)", self.address, self.name, self.worker_id)
        return self.worker_id

    def renewal_due(self, now: float | None = None) -> bool:
        """Whether this worker's certificate is past half its life (`CERTIFICATE_RENEW_S`)."""
        if self.certified_at is None:
            return False
        return (time.monotonic() if now is None else now) - self.certified_at > CERTIFICATE_RENEW_S

    def _take_certificate(self, member: MemberTls, worker_id: str, cert_pem: bytes) -> None:
        """Serve with the certificate the coordinator's authority signed for this worker,
        once it carries this worker's name (a coordinator that sends none or another's
        is refused: peers would refuse this worker anyway)."""
        try:
            name = certificate_name(cert_pem)
        except (CertificateError, ValueError) as e:
            raise RefusedError(f"the coordinator sent no usable certificate: {e}") from None
        if name != worker_name(worker_id):
            raise RefusedError(
                f"the coordinator's certificate names {name[:80]!r}, not this worker"
            )
        member.set_certificate(cert_pem)
        self.certified_at = time.monotonic()

    def _log_unreachable(self, e: grpc.aio.AioRpcError, wait_s: float = 0.0) -> None:
        if not self._unreachable_logged:
            log.warning("coordinator %s unreachable (%s); retrying", self.address, e.code().name)
            self._unreachable_logged = True

    async def heartbeat_loop(
        self, status: Callable[[], tuple[str, int, int, str]], stop_job: Callable[[str], object]
    ) -> None:
        """Heart-beat forever; re-register when forgotten; stop jobs the coordinator drops."""
        while True:
            job_id, epoch, step, state = status()
            try:
                reply = await self._stub.Heartbeat(
                    heartbeat_request_pb(
                        worker_id=self.worker_id, job_id=job_id, epoch=epoch, step=step, state=state
                    ),
                    metadata=self._metadata,
                    timeout=max(5.0, 3 * self.heartbeat_s),
                )
                answer = heartbeat_answer_from_pb(reply)
                self._unreachable_logged = False
                if not answer.known and not self.leaving:
                    await self.register()
                elif state == "idle" and not job_id and not self.leaving and self.renewal_due():
                    # Idle: a new registration (new certificate and credentials) disturbs
                    # no stage.
                    log.info("renewing this worker's certificate")
                    try:
                        await self.register()
                    except RefusedError as e:  # the old certificate serves on meanwhile
                        log.warning("renewing the certificate failed: %s", e)
                for dropped in answer.stop_jobs:
                    result = stop_job(dropped)
                    if asyncio.iscoroutine(result):
                        await result
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED and not self.leaving:
                    # The coordinator does not know this credential (its store was lost):
                    # register again, as when it says it does not know this worker.
                    log.warning("the coordinator refused this worker's credential; registering")
                    try:
                        await self.register()
                    except (RefusedError, grpc.aio.AioRpcError) as again:
                        log.warning("registering again failed: %s", again)
                else:
                    self._log_unreachable(e)
            await asyncio.sleep(self.heartbeat_s)

    async def leave(self) -> None:
        self.leaving = True
        try:
            await self._stub.Leave(
                leave_request_pb(self.worker_id), metadata=self._metadata, timeout=10
            )
        except grpc.aio.AioRpcError as e:
            log.warning("could not tell the coordinator this worker leaves: %s", e.code().name)

    # -- reports (the stage job's Reporter) ------------------------------------------------

    def progress(self, report: StepReport) -> None:
        self._reports.append((self.worker_id, report))
        self._report_ready.set()

    async def report_loop(self) -> None:
        """Deliver queued reports in order; keep each until the coordinator takes it."""
        while True:
            await self._report_ready.wait()
            while self._reports:
                worker_id, report = self._reports[0]
                request = progress_report_pb(worker_id, report)
                try:
                    await retry(
                        partial(self._report, request),
                        self.retry_policy,
                        retry_on=DELIVERY_RETRIED,
                        on_retry=self._log_unreachable,
                    )
                except grpc.aio.AioRpcError as e:
                    if e.code() not in OUTDATED:
                        raise
                    # The coordinator has moved on from that job or epoch: drop it.
                    log.info("report for job %s dropped: %s", report.job_id, e.details())
                self._reports.popleft()
            self._report_ready.clear()

    async def _report(self, request: ProgressReport) -> object:
        """One try of a report's delivery, with the credential current at this try."""
        return await self._stub.ReportProgress(request, metadata=self._metadata, timeout=10)

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued report is delivered; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._reports:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def checkpoint(
        self, plan: StagePlan, steps_done: int, tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """Upload this stage's state after `steps_done` steps, retrying while unreachable."""
        parts = checkpoint_parts(
            worker_id=self.worker_id, plan=plan, step=steps_done, tensors=tensors
        )
        try:
            await retry(
                lambda: self._stub.UploadCheckpoint(parts(), metadata=self._metadata),
                self.retry_policy,
                retry_on=DELIVERY_RETRIED,
                on_retry=self._log_unreachable,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() not in OUTDATED:
                raise
            log.warning("checkpoint of step %d refused: %s", steps_done, e.details())

    async def close(self) -> None:
        await self._channel.close()
