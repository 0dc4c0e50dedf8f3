"""The multi-process tests' cluster: `archipelago.localcluster`, re-exported, and what a
test needs to call a worker as its coordinator does, or as a peer, over the cluster's
mutual TLS (certificates from the authority in the cluster's store)."""

from __future__ import annotations

import grpc

from archipelago.localcluster import OPERATOR_TOKEN, TOKEN, Cluster, Proc, free_port, wait_for
from coordinator.authority import AUTHORITY_BLOB
from coordinator.registry import Registry
from coordinator.roles import COORDINATOR_KEY_BLOB, Gatekeeper
from proto.certificates import COORDINATOR_CLIENT_NAME, CertificateAuthority, worker_name
from proto.cluster_tls import MemberTls
from proto.rpc import CHANNEL_OPTIONS, open_blocking_channel

__all__ = [
    "OPERATOR_TOKEN",
    "TOKEN",
    "Cluster",
    "Proc",
    "coordinator_channel",
    "coordinator_credential",
    "free_port",
    "joining_tls",
    "member_tls",
    "probe_ticket",
    "signing_request_of",
    "wait_for",
    "worker_channel",
]


def coordinator_credential(cluster: Cluster, worker_id: str) -> str:
    """The credential `cluster`'s coordinator presents to worker `worker_id`, derived as the
    coordinator derives it (`coordinator.roles.Gatekeeper`) from what its store holds: its
    key and the worker's credential hash (only a reader of the store can)."""
    return _gate(cluster, worker_id).coordinator_credential(worker_id, "")


def _gate(cluster: Cluster, worker_id: str) -> Gatekeeper:
    """A gatekeeper like the cluster coordinator's, knowing the one worker `worker_id`."""
    from coordinator.store import open_store

    store = open_store(cluster.store)
    try:
        blob = store.get_blob(COORDINATOR_KEY_BLOB)
        record = store.get_worker(worker_id)
    finally:
        store.close()
    assert blob is not None and record is not None, f"no key or no worker {worker_id}"
    registry = Registry(timeout_s=1.0)
    registry.load([record])
    return Gatekeeper(
        registry,
        token=cluster.token,
        operator_token=cluster.operator_token,
        coordinator_key=blob.decode(),
    )


def probe_ticket(cluster: Cluster, prober_id: str, target_id: str) -> str:
    """The ticket `cluster`'s coordinator would give worker `prober_id` to probe
    `target_id` (derived from the store, as `coordinator_credential`)."""
    return _gate(cluster, target_id).probe_ticket(prober_id, target_id, "")


def _authority(cluster: Cluster) -> CertificateAuthority:
    from coordinator.store import open_store

    store = open_store(cluster.store)
    try:
        blob = store.get_blob(AUTHORITY_BLOB)
    finally:
        store.close()
    assert blob is not None, "the cluster's store holds no TLS authority"
    return CertificateAuthority.from_blob(blob, where="the cluster's store")


def member_tls(cluster: Cluster, name: str = COORDINATOR_CLIENT_NAME) -> MemberTls | None:
    """A TLS identity the cluster's authority certified under `name` (by default the
    coordinator's control identity; `worker_name(id)` to pass for a worker); None for a
    plain-text cluster."""
    if cluster.insecure:
        return None
    return MemberTls.for_coordinator(_authority(cluster), name)


def coordinator_channel(cluster: Cluster) -> grpc.Channel:
    """A blocking channel to the cluster's coordinator, trusting its authority (a caller's
    role comes from the credentials in each call's metadata)."""
    return open_blocking_channel(cluster.address, cluster.client_tls())


def worker_channel(
    cluster: Cluster, address: str, worker_id: str, *, as_name: str = COORDINATOR_CLIENT_NAME
) -> grpc.Channel:
    """A blocking channel to worker `worker_id` at `address`, verifying its certificate and
    presenting one certified under `as_name` (the coordinator's control identity by
    default: what lets the call reach the worker's credential checks)."""
    tls = member_tls(cluster, as_name)
    if tls is None:
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return open_blocking_channel(address, tls, name=worker_name(worker_id))


def joining_tls(cluster: Cluster) -> MemberTls | None:
    """What a volunteer holds before it registers: the cluster's authority (from the file
    the coordinator wrote) and a key of its own; None for a plain-text cluster. After
    `Register` (with `signing_request_of` it), `set_certificate` the reply's certificate."""
    return None if cluster.insecure else MemberTls(cluster.ca_file.read_bytes())


def signing_request_of(tls: MemberTls | None) -> bytes:
    """The CSR a Register of `tls`'s holder carries (none over plain text)."""
    return b"" if tls is None else tls.signing_request()
