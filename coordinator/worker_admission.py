"""Admitting a worker that registers: what its registration must say, where it may be, its
entry in the registry and its credentials.

A registration naming a worker id that exists (alive or not) is that worker coming back,
and only the worker itself may do so: the call must prove the id with its current
credential (`claimed`), or it is refused and nothing moves (else a join token would be
enough to take over any worker's identity and redirect its calls). Every admitted
registration gets a fresh credential; the previous one stops working.

Plain code over the registry and the job manager (the servicer decodes the request and
encodes the reply), so a registration's checks run without a network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from coordinator.capacity import check_claim
from coordinator.events import CLUSTER, EventKind
from coordinator.limits import RegistrationLimiter
from coordinator.registry import Registry, WorkerState
from coordinator.roles import Gatekeeper, WorkerKeys
from proto.certificates import (
    CertificateAuthority,
    CertificateError,
    check_signing_request,
    worker_name,
)
from proto.concurrency import caller_host
from proto.rpc import ADDRESS_PATTERN, Network, address_in_networks

if TYPE_CHECKING:  # the job manager's modules import the serde that imports this
    from coordinator.jobs import JobManager

log = logging.getLogger("archipelago.coordinator")


@dataclass(frozen=True)
class Registration:
    """What a worker says about itself when it joins (`worker_id` set when it comes back
    after a coordinator restart)."""

    name: str
    address: str
    gflops: float
    memory_bytes: int
    device: str
    threads: int
    worker_id: str = ""
    # Over TLS: the PEM signing request for the key of the worker's server.
    csr: bytes = b""


def check_registration(
    r: Registration, networks: Sequence[Network], *, loopback: bool = True
) -> None:
    """Refuse a registration: ValueError for a malformed one, PermissionError for an
    address outside `networks` (the --worker-networks; none: any). The coordinator calls
    every worker it admits, so an address is checked before it is ever used."""
    if not 0 < len(r.name) <= 100 or not r.name.isprintable():
        raise ValueError("worker name must be 1-100 printable characters")
    if not ADDRESS_PATTERN.match(r.address):
        raise ValueError(f"worker address {r.address[:80]!r} is not HOST:PORT")
    if not address_in_networks(r.address, networks, loopback=loopback):
        if networks:
            raise PermissionError(
                f"worker address {r.address[:80]!r} is outside the networks this "
                "coordinator accepts workers from (--worker-networks)"
            )
        raise PermissionError(
            f"worker address {r.address[:80]!r} is no volunteer's: loopback (this "
            "coordinator does not serve loopback), link-local, multicast or reserved "
            "(--worker-networks to accept such addresses)"
        )
    check_claim(r.gflops, r.memory_bytes, r.threads)
    if len(r.device) > 32:
        raise ValueError("implausible worker resources")


class WorkerAdmission:
    """Checks registrations and enters the workers that pass into the registry (stored
    before the worker hears it is in)."""

    def __init__(
        self,
        registry: Registry,
        manager: JobManager,
        networks: Sequence[Network] = (),
        *,
        gate: Gatekeeper,
        authority: CertificateAuthority | None = None,
        loopback: bool = True,
    ) -> None:
        self.registry = registry
        # Whether workers may be at this machine's loopback (the coordinator serves it).
        self.loopback = loopback
        # Over TLS, each admitted worker's server key is certified under its name.
        self.authority = authority
        self.manager = manager
        self.networks = tuple(networks)
        self.gate = gate
        self.limiter = RegistrationLimiter(manager.limits.registration)  # rate and cap

    async def admit(
        self, r: Registration, *, claimed: str | None = None
    ) -> tuple[WorkerState, WorkerKeys]:
        """The registered worker and its new credentials; ValueError or PermissionError as
        `check_registration`, PermissionError for an existing id that `claimed` (the
        worker id the call's credential proved, if any) is not."""
        check_registration(r, self.networks, loopback=self.loopback)
        if self.authority is not None:
            if not r.csr:
                raise ValueError(
                    "this coordinator speaks TLS: Register must carry a certificate signing "
                    "request for the worker's server key"
                )
            try:
                check_signing_request(r.csr)  # before anything changes
            except CertificateError as e:
                raise ValueError(str(e)) from None
        known = self.registry.get(r.worker_id[:64]) if r.worker_id else None
        if known is not None and claimed != known.worker_id:
            raise PermissionError(
                f"worker {known.worker_id} is registered already: only that worker, with its "
                "credential, may register under its id (register without an id to join anew)"
            )
        self.limiter.admit(caller_host(), self.registry, r.worker_id[:64])
        moved = known is not None and known.address != r.address
        w = self.registry.register(
            name=r.name,
            address=r.address,
            gflops=r.gflops,
            memory_bytes=r.memory_bytes,
            device=r.device or "cpu",
            threads=r.threads,
            worker_id=r.worker_id[:64],
        )
        if moved and self.registry.exclusions is not None:
            # Unreachable at its old address says nothing of the new one (found anew).
            await self.registry.exclusions.moved(w.worker_id, w.address)
        keys = self.gate.issue(w)
        if self.authority is not None:
            keys = replace(keys, certificate=self.authority.sign(r.csr, worker_name(w.worker_id)))
        await self.manager.save_workers([w])
        log.info(
            "worker %s (%s) at %s joined: %.1f GFLOP/s", w.name, w.worker_id, w.address, w.gflops
        )
        await self.manager.events.record(
            CLUSTER,
            EventKind.JOINED,
            f"worker {w.name} {'came back' if known else 'joined'} at {w.address}: "
            f"{w.gflops:.1f} GFLOP/s, {w.memory_bytes / 1e9:.1f} GB of memory",
            worker_id=w.worker_id,
            worker_name=w.name,
        )
        return w, keys
