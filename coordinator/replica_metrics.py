"""Per-replica and per-sync-group figures of a job's recent steps, from its stored metrics.

Every stage of every replica stores a record per step (`coordinator.step_metrics`): its step
time, the replica's share of the batch ("samples"), the bytes and seconds it spent averaging
with its sync group, its staleness, and how many shares the step's average held. These
summaries read the records of one plan epoch over its last few steps, as plain data that
`status` and `watch` print and tests check without a network.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Steps the figures cover: recent enough to follow a change, enough to smooth a slow step.
WINDOW_STEPS = 20


@dataclass(frozen=True)
class ReplicaSummary:
    """One replica (pipeline) over the window: its pace, its averaging cost, its staleness."""

    replica: int
    last_step: int  # the latest step any of its stages reported
    steps: int  # steps of the window it reported
    samples_per_s: float  # its share of the batch over its step time (slowest stage)
    sync_bytes_per_step: int  # all its stages together, to their groups
    sync_seconds_per_step: float  # its slowest stage's exchange each step, waiting included
    staleness: int  # steps since its stages were averaged (the most of them), at last_step
    speaker: bool  # the replica whose loss and pace are the job's


@dataclass(frozen=True)
class GroupSummary:
    """One stage's sync group (its replicas) over the window."""

    stage: int
    replicas: tuple[int, ...]
    steps: int
    sync_bytes_per_step: int  # all members together
    sync_seconds_per_step: float  # the slowest member's exchange each step
    staleness: int  # the most of its members, at each one's latest step
    rounds: int  # steps of the window that averaged parameters (or gradients)
    shares: int  # shares the latest average held (fewer than members: one was missing)


@dataclass(frozen=True)
class ReplicaMetrics:
    """A job's replicas and sync groups over its recent steps."""

    replicas: tuple[ReplicaSummary, ...] = ()
    groups: tuple[GroupSummary, ...] = ()


def _number(record: Mapping[str, Any], key: str) -> float:
    value = record.get(key, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _grouped(records: Iterable[Mapping[str, Any]], key: str) -> dict[int, list[Mapping[str, Any]]]:
    by: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by[int(r.get(key, 0))].append(r)
    return by


def _replica(replica: int, records: list[Mapping[str, Any]]) -> ReplicaSummary:
    steps = _grouped(records, "step")
    seconds = samples = sync_s = 0.0
    sync_b = 0
    for rs in steps.values():
        # The stages of a pipeline run side by side: a step takes as long as its slowest.
        seconds += max(_number(r, "step_seconds") for r in rs)
        samples += max(_number(r, "samples") for r in rs)
        sync_s += max(_number(r, "sync_seconds") for r in rs)
        sync_b += int(sum(_number(r, "sync_bytes") for r in rs))
    last = max(steps)
    n = len(steps)
    return ReplicaSummary(
        replica=replica,
        last_step=last,
        steps=n,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        sync_bytes_per_step=sync_b // n,
        sync_seconds_per_step=sync_s / n,
        staleness=int(max(_number(r, "staleness") for r in steps[last])),
        speaker=any(bool(r.get("speaker")) for r in steps[last]),
    )


def _group(stage: int, records: list[Mapping[str, Any]]) -> GroupSummary:
    steps = _grouped(records, "step")
    members = _grouped(records, "replica")
    n = len(steps)
    # An exchange of fresh parameters or gradients; local SGD also exchanges the loss of
    # every step, which leaves the parameters stale.
    averaged = sorted(
        s
        for s, rs in steps.items()
        if any(_number(r, "shares") > 0 and _number(r, "staleness") == 0 for r in rs)
    )
    return GroupSummary(
        stage=stage,
        replicas=tuple(sorted(members)),
        steps=n,
        sync_bytes_per_step=int(sum(_number(r, "sync_bytes") for r in records)) // n,
        sync_seconds_per_step=sum(
            max(_number(r, "sync_seconds") for r in rs) for rs in steps.values()
        )
        / n,
        staleness=int(
            max(
                _number(max(rs, key=lambda r: int(r["step"])), "staleness")
                for rs in members.values()
            )
        ),
        rounds=len(averaged),
        shares=int(max(_number(r, "shares") for r in steps[averaged[-1]])) if averaged else 0,
    )


def summarise_replicas(
    records: Iterable[Mapping[str, Any]], *, epoch: int, window: int = WINDOW_STEPS
) -> ReplicaMetrics:
    """The replicas and sync groups of plan `epoch` over its last `window` steps, from
    stored metric records (each with "step", "stage", and "replica" unless it is 0)."""
    mine = [r for r in records if r.get("epoch") == epoch and "step" in r]
    if not mine:
        return ReplicaMetrics()
    first = sorted({int(r["step"]) for r in mine})[-window:][0]
    recent = [{**r, "replica": int(r.get("replica", 0))} for r in mine if int(r["step"]) >= first]
    by_replica = _grouped(recent, "replica")
    by_stage = _grouped(recent, "stage")
    return ReplicaMetrics(
        replicas=tuple(_replica(r, by_replica[r]) for r in sorted(by_replica)),
        groups=tuple(_group(s, by_stage[s]) for s in sorted(by_stage)),
    )
