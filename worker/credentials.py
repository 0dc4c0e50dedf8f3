"""What a worker holds to prove itself and to know its coordinator, and the checks of who
calls it.

The coordinator's `RegisterReply` gives the worker two secrets (`admit`): its own
credential, sent with its id on every call to the coordinator, and the coordinator's
credential toward it, which the worker demands of every call only the coordinator makes
(`LoadStage`, `StartJob`, `StopJob`, `Status`, `MeasureLinks`, `SpotEvidence`): a peer
worker or anyone holding the join token is refused. A re-registration replaces both. Until
the first one the worker takes no coordinator call at all.

Peer calls carry the join token (every volunteer has it: it only keeps strangers from
reaching the checks behind it) and a narrower secret: a transfer, the secret of its stage
pair (`worker.node`); a `Probe`, the coordinator's ticket for this (prober, target) pair,
an HMAC under the coordinator's credential toward this worker, which this worker checks
and no one else can make.

A refusal is `Unauthenticated` (no credential or a wrong one) or `PermissionError` (the
join token used for a call it does not allow); comparisons are constant-time.
"""

from __future__ import annotations

from typing import Any

from proto.rpc import (
    COORDINATOR_HEADER,
    PROBE_TICKET_HEADER,
    WORKER_ID_HEADER,
    Metadata,
    metadata_value,
    secret_matches,
    ticket,
    token_matches,
    worker_metadata,
)


class Unauthenticated(Exception):
    """A call without the credential it needs, or with a wrong one."""


class NodeCredentials:
    """This worker's id and secrets, as its latest registration gave them."""

    def __init__(self) -> None:
        self.worker_id = ""
        self.credential = ""
        self.coordinator = ""

    def admit(self, worker_id: str, credential: str, coordinator: str) -> None:
        """Take the secrets of a (new) registration; the previous ones stop counting."""
        self.worker_id, self.credential, self.coordinator = worker_id, credential, coordinator

    def metadata(self) -> Metadata:
        """What proves this worker to the coordinator (nothing before it has registered)."""
        if not self.credential:
            return ()
        return worker_metadata(self.worker_id, self.credential)

    def check_coordinator(self, metadata: Any, rpc: str, join_token: str) -> None:
        """Refuse `rpc` unless the coordinator made it."""
        given = metadata_value(metadata, COORDINATOR_HEADER)
        if given is not None:
            if not self.coordinator:
                raise Unauthenticated(f"{rpc}: this worker has not registered yet")
            if secret_matches(given, self.coordinator):
                return
            raise Unauthenticated(f"{rpc}: wrong coordinator credential")
        if token_matches(metadata, join_token):
            raise PermissionError(
                f"{rpc} is the coordinator's to call: the join token does not allow it"
            )
        raise Unauthenticated(f"{rpc}: missing coordinator credential (or join token)")

    def check_probe(self, metadata: Any, join_token: str) -> None:
        """Refuse a `Probe` that neither the coordinator nor a worker it sent makes."""
        if metadata_value(metadata, COORDINATOR_HEADER) is not None:
            self.check_coordinator(metadata, "Probe", join_token)
            return
        if not token_matches(metadata, join_token):
            raise Unauthenticated("Probe: missing or wrong join token")
        given = metadata_value(metadata, PROBE_TICKET_HEADER)
        prober = metadata_value(metadata, WORKER_ID_HEADER) or ""
        expected = (
            ticket(self.coordinator, "probe", prober, self.worker_id) if self.coordinator else ""
        )
        if given is None:
            raise PermissionError(
                "Probe needs the coordinator's probe ticket; the join token alone does not allow it"
            )
        if not secret_matches(given, expected):
            raise Unauthenticated(f"Probe: wrong probe ticket for worker {prober[:64]!r}")
