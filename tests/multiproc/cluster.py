"""The multi-process tests' cluster: `archipelago.localcluster`, re-exported, and what a
test needs to call a worker as its coordinator does."""

from __future__ import annotations

from archipelago.localcluster import OPERATOR_TOKEN, TOKEN, Cluster, Proc, free_port, wait_for
from coordinator.registry import Registry
from coordinator.roles import COORDINATOR_KEY_BLOB, Gatekeeper

__all__ = [
    "OPERATOR_TOKEN",
    "TOKEN",
    "Cluster",
    "Proc",
    "coordinator_credential",
    "free_port",
    "probe_ticket",
    "wait_for",
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
