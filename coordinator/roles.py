"""Who calls the coordinator, and what each caller may do.

Four credentials, each for one role (they travel as `proto.rpc` describes):

- the join token, shared by every volunteer: it allows `Register` and nothing else;
- a worker's own credential, issued in its `RegisterReply`, bound to its id and replaced
  on every registration (the previous one stops working at once): `Heartbeat` and `Leave`
  for that worker only, `ReportProgress` and `UploadCheckpoint` only for a stage the
  current plan gave that worker, `GetDatasetManifest` and `GetDatasetChunk` only for the
  dataset of a job whose stage 0 the current plan gave that worker (users' own data), and
  `Register` again under its id (no one else may re-register an id that exists: the join
  token alone cannot take over a worker or move its address);
- the operator token: `SubmitJob`, `SubmitModelJob` (a job with the user's own captured
  model), `MissingDatasetChunks`, `PutDatasetChunk` and `PutDataset` (`archipelago data
  put`: a user's own dataset), `CancelJob` and every read (`GetJob`, `ListJobs`,
  `WatchJob`, `ListWorkers`, `ListLinks`, `GetPlan`, `ListEvents`, `JobRecords`,
  `ExportModel`: a job's trained model, `DescribeDataset`: a stored dataset's manifest);
- the coordinator's credential toward each worker, which only the two know: what the
  worker demands on the coordinator's calls (`worker.credentials`). It is not stored: it is
  derived (`ticket`) from the coordinator key, a random secret kept in the store (the one
  secret there: whoever reads the store can already rewrite every job), and the worker's
  credential hash, so a restarted coordinator calls its workers at once and a worker's
  re-registration changes it too. Probe tickets and stage-pair secrets are derived the same
  way (`probe_ticket`; `coordinator.serde` for the pairs).

Of a worker's credential only its SHA-256 is kept (in the worker's record, so a restarted
coordinator still knows its workers). A refusal is `Unauthenticated` (no credential, or a
wrong one: UNAUTHENTICATED) or `PermissionError` (a right credential used outside its
role: PERMISSION_DENIED), raised before anything changes; every comparison is constant-time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.registry import Registry, WorkerState
from proto.rpc import (
    MIN_SECRET_CHARS,
    OPERATOR_HEADER,
    TOKEN_HEADER,
    WORKER_CREDENTIAL_HEADER,
    WORKER_ID_HEADER,
    metadata_value,
    new_secret,
    secret_hash,
    secret_matches,
    ticket,
)

if TYPE_CHECKING:
    from coordinator.job_record import Job
    from coordinator.store.interface import StateStore

log = logging.getLogger("archipelago.coordinator")

# Where the coordinator key lives in the store.
COORDINATOR_KEY_BLOB = "coordinator/worker-key"
# The file a generated operator token is written to, in the coordinator's state directory.
OPERATOR_TOKEN_FILE = "operator-token"


class Role(enum.Enum):
    """What a caller proved it is."""

    VOLUNTEER = "the join token"
    WORKER = "a worker's credential"
    OPERATOR = "the operator token"


@dataclass(frozen=True)
class Caller:
    """Who called: a role, and for a worker its id."""

    role: Role
    worker_id: str = ""

    def __str__(self) -> str:
        if self.role == Role.VOLUNTEER:
            return "the join token (it allows Register only)"
        if self.role == Role.WORKER:
            return f"worker {self.worker_id}'s credential"
        return "the operator token"


class Unauthenticated(Exception):
    """A call without a credential, or with a wrong one."""


@dataclass(frozen=True)
class WorkerKeys:
    """What a registration hands the worker: its own credential, the coordinator's toward
    it, and over TLS the certificate the authority signed for its server's key."""

    credential: str
    coordinator: str
    certificate: bytes = b""


class Gatekeeper:
    """Checks the credentials of calls, and issues and derives the workers' ones."""

    def __init__(
        self, registry: Registry, *, token: str, operator_token: str, coordinator_key: str
    ) -> None:
        if len(operator_token) < MIN_SECRET_CHARS:
            raise ValueError(f"the operator token must be at least {MIN_SECRET_CHARS} characters")
        if len(coordinator_key) < MIN_SECRET_CHARS:
            raise ValueError("the coordinator key in the store is too short")
        if secret_matches(operator_token, token):
            raise ValueError("the operator token must differ from the join token")
        self.registry = registry
        self.token = token
        self.operator_token = operator_token
        self._key = coordinator_key
        # What an unknown id's credential is compared with: the same work as a known one's.
        self._absent = secret_hash(new_secret())

    # -- calls ------------------------------------------------------------------------------

    def identify(self, metadata: Any) -> Caller:
        """The caller the metadata proves; Unauthenticated for none or a wrong one. The
        strongest credential given counts: operator, then worker, then the join token."""
        operator = metadata_value(metadata, OPERATOR_HEADER)
        if operator is not None:
            if secret_matches(operator, self.operator_token):
                return Caller(Role.OPERATOR)
            raise Unauthenticated("wrong operator token")
        worker_id = self.worker(metadata)
        if worker_id is not None:
            return Caller(Role.WORKER, worker_id)
        token = metadata_value(metadata, TOKEN_HEADER)
        if token is not None and secret_matches(token, self.token):
            return Caller(Role.VOLUNTEER)
        raise Unauthenticated("missing or wrong join token (and no other credential)")

    def require(self, metadata: Any, rpc: str, *roles: Role) -> Caller:
        """The caller, if it holds one of `roles`; PermissionError naming what `rpc` needs
        when it holds another."""
        caller = self.identify(metadata)
        if caller.role not in roles:
            needs = " or ".join(r.value for r in roles)
            raise PermissionError(f"{rpc} needs {needs}; {caller} does not allow it")
        return caller

    def worker(self, metadata: Any) -> str | None:
        """The worker id the metadata proves (None: it claims none); Unauthenticated for an
        unknown id or a credential that is not the id's current one."""
        worker_id = metadata_value(metadata, WORKER_ID_HEADER)
        if worker_id is None:
            return None
        given = metadata_value(metadata, WORKER_CREDENTIAL_HEADER)
        w = self.registry.get(worker_id)
        expected = w.credential_hash if w is not None else ""
        # Hashed and compared the same way whatever was given, for a known id or not.
        matches = secret_matches(secret_hash(given or ""), expected or self._absent)
        if not (given and expected and matches):
            raise Unauthenticated(f"worker {worker_id[:64]!r}: unknown id or wrong credential")
        return worker_id

    # -- workers' credentials ---------------------------------------------------------------

    def issue(self, w: WorkerState) -> WorkerKeys:
        """A fresh credential for `w` (its hash replaces the previous one's in `w`, to be
        stored by the caller), and the coordinator's credential toward it."""
        credential = new_secret()
        w.credential_hash = secret_hash(credential)
        return WorkerKeys(credential, self.coordinator_credential_of(w))

    def coordinator_credential_of(self, w: WorkerState) -> str:
        if not w.credential_hash:
            return ""  # a record from before credentials: the worker must register again
        return ticket(self._key, "coordinator", w.worker_id, w.credential_hash)

    def coordinator_credential(self, worker_id: str, address: str) -> str:
        """The credential for calling the worker `worker_id` ("": find it by `address`;
        "" when no worker is known there)."""
        w = self.registry.get(worker_id) if worker_id else self.registry.at_address(address)
        return self.coordinator_credential_of(w) if w is not None else ""

    def probe_ticket(self, prober_id: str, target_id: str, target_address: str) -> str:
        """What lets worker `prober_id` probe the link to `target_id`: checked by the
        target under its coordinator credential (`worker.credentials`)."""
        key = self.coordinator_credential(target_id, target_address)
        return ticket(key, "probe", prober_id, target_id) if key else ""


def check_assigned(
    job: Job | None,
    *,
    caller: str,
    named: str,
    what: str,
    job_id: str,
    epoch: int,
    stage: int,
    replica: int | None,
) -> None:
    """PermissionError unless worker `caller` may send `what` (a report, a checkpoint)
    naming worker `named` for `stage` (of `replica`; None: any) of the job's plan `epoch`:
    it must name itself, and the current plan must have given it that stage. A report for a
    job or epoch that is not current is the job manager's to refuse (it changes nothing)."""
    if named != caller:
        raise PermissionError(
            f"the {what} names worker {named[:64]!r}, but worker {caller} sent it"
        )
    if job is None or job.plan is None or job.epoch != epoch:
        return
    for p in job.plan.placements:
        if p.stage == stage and p.worker_id == caller and replica in (None, p.replica):
            return
    of_replica = f" of replica {replica}" if replica is not None else ""
    raise PermissionError(
        f"worker {caller} does not run stage {stage}{of_replica} of job {job_id[:64]} epoch "
        f"{epoch}: its {what} is refused"
    )


# -- the coordinator's own secrets ------------------------------------------------------------


async def load_coordinator_key(store: StateStore) -> str:
    """The coordinator key from the store, made and stored on a first start."""
    blob = await asyncio.to_thread(store.get_blob, COORDINATOR_KEY_BLOB)
    if blob:
        return blob.decode()
    key = new_secret()
    await asyncio.to_thread(store.put_blob, COORDINATOR_KEY_BLOB, key.encode())
    return key


def operator_token(given: str, file: Path | None, state_dir: Path) -> tuple[str, Path | None]:
    """The operator token: `given`, else the first line of `file`, else the one in
    `state_dir` (written there, readable by its owner only, on a first start). Returns it
    and the file it was generated into (None when given)."""
    if given:
        return given.strip(), None
    if file is not None:
        try:
            return file.read_text().strip(), None
        except OSError as e:
            raise ValueError(f"cannot read the operator token file {file}: {e.strerror}") from None
    path = state_dir / OPERATOR_TOKEN_FILE
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_secret() + "\n")
    return path.read_text().strip(), path
