"""What this coordinator's workers can run today, checked when a job is submitted.

The job spec describes every policy the design names; a policy the runtime does not carry
out yet is refused at submission with a message naming the field, rather than accepted
and silently run as something else.
"""

from __future__ import annotations

from coordinator.planning.jobspec import JobSpec

# Sync kinds whose replicas the workers keep together as the spec says.
RUNNABLE_SYNC_KINDS: frozenset[str] = frozenset({"sync", "local-sgd", "partial-local-sgd"})
# Wire formats of averaged tensors the workers send.
RUNNABLE_SYNC_VALUES: frozenset[str] = frozenset({"fp32", "fp16"})
# Whether the workers apply an outer optimizer (DiLoCo) at averaging rounds.
RUNS_OUTER_OPTIMIZER = True


def unrunnable_setting(spec: JobSpec) -> str | None:
    """Why `spec` asks for something the workers cannot run yet, or None."""
    sync = spec.sync
    if sync.kind not in RUNNABLE_SYNC_KINDS:
        return (
            f"sync.kind: {sync.kind} is not run by this version yet "
            f"(runs: {', '.join(sorted(RUNNABLE_SYNC_KINDS))})"
        )
    if sync.values not in RUNNABLE_SYNC_VALUES:
        return (
            f"sync.values: {sync.values} is not run by this version yet "
            f"(runs: {', '.join(sorted(RUNNABLE_SYNC_VALUES))})"
        )
    if sync.outer is not None and not RUNS_OUTER_OPTIMIZER:
        return "sync.outer: outer optimizers are not run by this version yet"
    return None
