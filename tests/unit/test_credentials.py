"""Identities and roles without a network: what each credential proves and allows
(`coordinator.roles`, `worker.credentials`), a worker's credential rotating on every
registration, an id that only its worker may register again, what the store keeps, the
operator token file, and the stage-pair secrets a plan hands out."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.limits import CoordinatorLimits
from coordinator.planning.plan import Placement
from coordinator.registry import Registry, WorkerState
from coordinator.roles import (
    Caller,
    Gatekeeper,
    Role,
    Unauthenticated,
    check_assigned,
    operator_token,
)
from coordinator.serde import stage_pair_secret
from coordinator.worker_admission import Registration, WorkerAdmission
from proto.rpc import (
    coordinator_metadata,
    operator_metadata,
    probe_metadata,
    secret_hash,
    ticket,
    token_metadata,
    worker_metadata,
)
from worker.credentials import NodeCredentials
from worker.credentials import Unauthenticated as WorkerUnauthenticated

JOIN = "the-volunteers-join-token"
OPERATOR = "the-operators-own-token"
KEY = "k" * 43


def gate_with(*workers: WorkerState) -> Gatekeeper:
    registry = Registry(timeout_s=5.0)
    for w in workers:
        registry.workers[w.worker_id] = w
    return Gatekeeper(registry, token=JOIN, operator_token=OPERATOR, coordinator_key=KEY)


def worker(worker_id: str = "w1", address: str = "127.0.0.1:7101") -> WorkerState:
    return WorkerState(worker_id=worker_id, name=worker_id, address=address)


def test_each_credential_proves_its_role_and_a_wrong_one_proves_nothing() -> None:
    w = worker()
    gate = gate_with(w)
    keys = gate.issue(w)
    assert gate.identify(token_metadata(JOIN)) == Caller(Role.VOLUNTEER)
    assert gate.identify(operator_metadata(OPERATOR)) == Caller(Role.OPERATOR)
    assert gate.identify(worker_metadata("w1", keys.credential)) == Caller(Role.WORKER, "w1")
    for metadata, match in [
        ((), "missing or wrong join token"),
        (token_metadata("a-wrong-join-token"), "missing or wrong join token"),
        (operator_metadata("a-wrong-operator"), "wrong operator token"),
        (worker_metadata("w1", "not-its-credential"), "unknown id or wrong credential"),
        (worker_metadata("w2", keys.credential), "unknown id or wrong credential"),
        # A better credential beside a wrong one does not make it right.
        (operator_metadata("a-wrong-operator") + token_metadata(JOIN), "wrong operator"),
    ]:
        with pytest.raises(Unauthenticated, match=match):
            gate.identify(metadata)


def test_a_right_credential_outside_its_role_is_denied_by_name() -> None:
    w = worker()
    gate = gate_with(w)
    keys = gate.issue(w)
    with pytest.raises(PermissionError, match=r"GetJob needs the operator token; the join token"):
        gate.require(token_metadata(JOIN), "GetJob", Role.OPERATOR)
    with pytest.raises(PermissionError, match=r"SubmitJob needs the operator token; worker w1"):
        gate.require(worker_metadata("w1", keys.credential), "SubmitJob", Role.OPERATOR)
    with pytest.raises(PermissionError, match=r"Leave needs a worker's credential; the operator"):
        gate.require(operator_metadata(OPERATOR), "Leave", Role.WORKER)
    assert gate.require(operator_metadata(OPERATOR), "GetJob", Role.OPERATOR).role == Role.OPERATOR


def test_a_new_registration_replaces_the_credential_and_the_coordinators_one() -> None:
    w = worker()
    gate = gate_with(w)
    first = gate.issue(w)
    second = gate.issue(w)
    assert first.credential != second.credential and first.coordinator != second.coordinator
    with pytest.raises(Unauthenticated):
        gate.identify(worker_metadata("w1", first.credential))
    assert gate.worker(worker_metadata("w1", second.credential)) == "w1"
    # The store keeps the hash, never the credential; the coordinator's is derived, not kept.
    record = w.to_record()
    assert record["credential_hash"] == secret_hash(second.credential)
    assert second.credential not in str(record) and second.coordinator not in str(record)
    again = gate_with(WorkerState.from_record(record))  # a restarted coordinator
    assert again.worker(worker_metadata("w1", second.credential)) == "w1"
    assert again.coordinator_credential("w1", "") == second.coordinator
    assert again.coordinator_credential("", w.address) == second.coordinator  # by address


def test_gatekeeper_refuses_a_short_operator_token_or_the_join_token_as_one() -> None:
    registry = Registry(timeout_s=5.0)
    with pytest.raises(ValueError, match="at least 16"):
        Gatekeeper(registry, token=JOIN, operator_token="short", coordinator_key=KEY)
    with pytest.raises(ValueError, match="differ from the join token"):
        Gatekeeper(registry, token=JOIN, operator_token=JOIN, coordinator_key=KEY)


class FakeManager:
    """What admission asks of the job manager: storing workers and recording events."""

    def __init__(self) -> None:
        self.saved: list[dict[str, Any]] = []
        self.events = self
        self.limits = CoordinatorLimits()

    async def save_workers(self, workers: list[WorkerState]) -> None:
        self.saved += [w.to_record() for w in workers]

    async def record(self, *args: Any, **kw: Any) -> None:
        pass


def test_only_a_worker_with_its_credential_registers_under_its_id() -> None:
    manager = FakeManager()
    gate = gate_with()
    admission = WorkerAdmission(gate.registry, manager, gate=gate)  # type: ignore[arg-type]
    join = Registration("w", "127.0.0.1:7101", 1.0, 1 << 30, "cpu", 1)
    w, keys = asyncio.run(admission.admit(join))
    theft = Registration("w", "127.0.0.1:9", 1.0, 1 << 30, "cpu", 1, worker_id=w.worker_id)
    for claimed in (None, "another-worker"):
        with pytest.raises(PermissionError, match="registered already"):
            asyncio.run(admission.admit(theft, claimed=claimed))
    assert w.address == "127.0.0.1:7101" and len(manager.saved) == 1  # nothing moved
    back, again = asyncio.run(admission.admit(theft, claimed=w.worker_id))
    assert back is w and w.address == "127.0.0.1:9" and again.credential != keys.credential
    assert manager.saved[-1]["credential_hash"] == secret_hash(again.credential)


def plan_job(epoch: int = 2) -> Any:
    """A stand-in for a job with a plan: stage 0 on w1, stage 1 on w2 and (replica 1) w3."""
    placements = [
        Placement(0, "w1", "w1", "a:1", 1, 1, 1.0),
        Placement(1, "w2", "w2", "a:2", 1, 1, 1.0),
        Placement(1, "w3", "w3", "a:3", 1, 1, 1.0, replica=1),
    ]
    return SimpleNamespace(epoch=epoch, plan=SimpleNamespace(placements=placements))


def test_reports_are_taken_only_from_the_worker_the_plan_gave_the_stage() -> None:
    job = plan_job()
    kw: dict[str, Any] = {"what": "progress report", "job_id": "j1", "epoch": 2}
    check_assigned(job, caller="w2", named="w2", stage=1, replica=0, **kw)
    check_assigned(job, caller="w3", named="w3", stage=1, replica=1, **kw)
    check_assigned(job, caller="w3", named="w3", stage=1, replica=None, **kw)  # a checkpoint
    with pytest.raises(PermissionError, match="names worker 'ghost', but worker w1 sent it"):
        check_assigned(job, caller="w1", named="ghost", stage=0, replica=0, **kw)
    with pytest.raises(PermissionError, match="worker w1 does not run stage 1 of replica 0"):
        check_assigned(job, caller="w1", named="w1", stage=1, replica=0, **kw)
    with pytest.raises(PermissionError, match="worker w3 does not run stage 1 of replica 0"):
        check_assigned(job, caller="w3", named="w3", stage=1, replica=0, **kw)
    # Another epoch or job is the job manager's to call stale; still only in one's own name.
    check_assigned(job, caller="w1", named="w1", stage=1, replica=0, what="x", job_id="j1", epoch=1)
    check_assigned(None, caller="w1", named="w1", stage=5, replica=0, **kw)


def test_a_worker_takes_coordinator_calls_only_with_the_coordinators_credential() -> None:
    node = NodeCredentials()
    with pytest.raises(WorkerUnauthenticated, match="has not registered yet"):
        node.check_coordinator(coordinator_metadata("anything"), "LoadStage", JOIN)
    node.admit("w1", "its-own-credential", "the-coordinators-credential")
    node.check_coordinator(coordinator_metadata("the-coordinators-credential"), "StopJob", JOIN)
    with pytest.raises(PermissionError, match="StopJob is the coordinator's to call"):
        node.check_coordinator(token_metadata(JOIN), "StopJob", JOIN)
    with pytest.raises(WorkerUnauthenticated, match="wrong coordinator credential"):
        node.check_coordinator(coordinator_metadata("a-guess"), "StopJob", JOIN)
    with pytest.raises(WorkerUnauthenticated, match="missing coordinator credential"):
        node.check_coordinator(worker_metadata("w2", "its-credential"), "StopJob", JOIN)
    assert node.metadata() == worker_metadata("w1", "its-own-credential")


def test_a_probe_needs_the_coordinators_ticket_for_that_prober() -> None:
    w = worker("target")
    gate = gate_with(w)
    keys = gate.issue(w)
    node = NodeCredentials()
    node.admit("target", keys.credential, keys.coordinator)
    granted = gate.probe_ticket("prober", "target", "")
    node.check_probe(token_metadata(JOIN) + probe_metadata("prober", granted), JOIN)
    with pytest.raises(PermissionError, match="probe ticket"):
        node.check_probe(token_metadata(JOIN), JOIN)
    for metadata in (
        token_metadata(JOIN) + probe_metadata("someone-else", granted),
        token_metadata(JOIN) + probe_metadata("prober", ticket("a-guessed-key", "probe")),
        probe_metadata("prober", granted),  # without the join token
    ):
        with pytest.raises(WorkerUnauthenticated):
            node.check_probe(metadata, JOIN)


def test_each_stage_pair_has_its_own_secret() -> None:
    plan_secret = "p" * 32
    pair = stage_pair_secret(plan_secret, "j", 1, 0, 0, 1)
    assert pair == stage_pair_secret(plan_secret, "j", 1, 0, 1, 0)  # both ends hold it
    others = {
        stage_pair_secret(plan_secret, "j", 1, 0, 0, 2),
        stage_pair_secret(plan_secret, "j", 1, 0, 1, 2),
        stage_pair_secret(plan_secret, "j", 1, 1, 0, 1),  # another replica's
        stage_pair_secret(plan_secret, "j", 2, 0, 0, 1),  # another plan's
        stage_pair_secret("q" * 32, "j", 1, 0, 0, 1),
    }
    assert pair not in others and len(others) == 5


def test_a_generated_operator_token_is_kept_for_its_owner_only(tmp_path: Path) -> None:
    token, path = operator_token("", None, tmp_path / "state")
    assert path == tmp_path / "state" / "operator-token" and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert operator_token("", None, tmp_path / "state") == (token, path)  # the same next start
    given = tmp_path / "given"
    given.write_text("from-a-file-of-its-own\n")
    assert operator_token("", given, tmp_path / "elsewhere") == ("from-a-file-of-its-own", None)
    assert operator_token("on-the-command-line", given, tmp_path) == ("on-the-command-line", None)
    with pytest.raises(ValueError, match="cannot read the operator token file"):
        operator_token("", tmp_path / "missing", tmp_path)
