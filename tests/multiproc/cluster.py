"""The multi-process tests' cluster: `archipelago.localcluster`, re-exported."""

from archipelago.localcluster import TOKEN, Cluster, Proc, free_port, wait_for

__all__ = ["TOKEN", "Cluster", "Proc", "free_port", "wait_for"]
