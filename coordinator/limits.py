"""Every bound the coordinator keeps against cheap denial of service, with its default and
its flag, in one place; and the registration limiter.

The bounds, and where each is enforced:

| bound | default | flag | enforced by |
|---|---|---|---|
| job spec text | 64 KiB | --max-spec-bytes | `coordinator.planning.spec_yaml` |
| YAML nesting | 16 | --max-spec-depth | `coordinator.planning.spec_yaml` |
| YAML values | 2000 | --max-spec-nodes | `coordinator.planning.spec_yaml` |
| YAML anchors and aliases | refused | (none) | `coordinator.planning.spec_yaml` |
| batch size | 65,536 | --max-batch-size | `coordinator.planning.spec_limits` |
| micro-batches | 1024 | --max-micro-batches | `coordinator.planning.spec_limits` |
| steps | 10,000,000 | --max-steps | `coordinator.planning.spec_limits` |
| model parameters | 1e9 | --max-model-params | `coordinator.planning.spec_limits` |
| model training memory | 64 GB | --max-model-memory-gb | `coordinator.planning.spec_limits` |
| model operators | 20,000 | --max-model-operators | `coordinator.planning.spec_limits` |
| calls served at once | 1024 | --max-rpcs | `proto.concurrency` |
| calls at once per address | 128 | --max-rpcs-per-peer | `proto.concurrency` |
| registrations per address | 30 a minute | --registrations-per-minute | `RegistrationLimiter` |
| live workers | 10,000 | --max-workers | `RegistrationLimiter` |
| a user's dataset | 4096 MiB | --max-dataset-mb | `coordinator.datasets` |

A worker bounds its own server (`proto.concurrency.WORKER_RPC_LIMITS`: 256 calls, 128 per
address; the same two flags on `archipelago worker`) and its inbox, which keeps only the
messages of the steps its schedule can have in flight (`worker.inbox.Inbox`).

Parsing a spec runs off the event loop (`JobManager.submit`), so even a spec at the bounds
never holds up heart-beats.
"""

from __future__ import annotations

import argparse
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from coordinator.planning.spec_limits import GB, SpecLimits
from proto.concurrency import (
    COORDINATOR_RPC_LIMITS,
    LimitExceeded,
    RpcLimits,
    add_rpc_limit_flags,
    positive_int,
    rpc_limits_from_flags,
)

if TYPE_CHECKING:  # the command line reads the flags from here without the registry
    from coordinator.registry import Registry

log = logging.getLogger("archipelago.coordinator")

WINDOW_S = 60.0
# A user's dataset, in its stored form, is at most this big unless --max-dataset-mb says.
DEFAULT_MAX_DATASET_BYTES = 4 << 30  # the registration rate is counted over the last minute


@dataclass(frozen=True)
class RegistrationLimits:
    """How fast one address may register workers, and how many may be live at once."""

    per_address_per_minute: int = 30
    max_workers: int = 10_000

    def __post_init__(self) -> None:
        if self.per_address_per_minute < 1 or self.max_workers < 1:
            raise ValueError("--registrations-per-minute and --max-workers must be at least 1")


@dataclass(frozen=True)
class CoordinatorLimits:
    """All the coordinator's bounds (built from the command line; defaults otherwise)."""

    spec: SpecLimits = field(default_factory=SpecLimits)
    rpc: RpcLimits = COORDINATOR_RPC_LIMITS
    registration: RegistrationLimits = field(default_factory=RegistrationLimits)
    # Bytes of one user's dataset in its stored form (`archipelago data put`).
    max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES


class RegistrationLimiter:
    """Refuses a registration past the per-address rate or the cap on live workers.

    Only admitted registrations count towards the rate (a refused one costs nothing to
    check again), over a sliding minute. A worker coming back under its own id (after a
    coordinator restart) is not held to the cap: it is counted there already, or was.
    """

    def __init__(
        self, limits: RegistrationLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.clock = clock
        self._admitted: dict[str, collections.deque[float]] = {}
        self._warned: dict[str, float] = {}

    def admit(self, source: str, registry: Registry, worker_id: str = "") -> None:
        """Count a registration from `source` in, or raise LimitExceeded."""
        now = self.clock()
        source = source or "an unknown address"
        self._forget_before(now - WINDOW_S)
        recent = self._admitted.get(source, collections.deque())
        limit = self.limits.per_address_per_minute
        if len(recent) >= limit:
            self._refused(source, now)
            raise LimitExceeded(
                f"registration refused: {source} registered {len(recent)} workers in the "
                f"last minute, the most one address may (--registrations-per-minute {limit})"
            )
        if worker_id not in registry.workers:
            live = sum(1 for w in registry.workers.values() if w.alive)
            if live >= self.limits.max_workers:
                self._refused(source, now)
                raise LimitExceeded(
                    f"registration refused: {live} workers are registered, the most this "
                    f"coordinator takes (--max-workers {self.limits.max_workers})"
                )
        recent.append(now)
        self._admitted[source] = recent

    def _forget_before(self, cutoff: float) -> None:
        # Every address's old admissions go, so the table holds only the last minute's.
        for source in list(self._admitted):
            recent = self._admitted[source]
            while recent and recent[0] <= cutoff:
                recent.popleft()
            if not recent:
                del self._admitted[source]
        for source in [s for s, t in self._warned.items() if t <= cutoff]:
            del self._warned[source]

    def _refused(self, source: str, now: float) -> None:
        # One line a minute per address: a flood must not flood the log too.
        if source not in self._warned:
            self._warned[source] = now
            log.warning("registrations from %s refused by the limits", source)


def add_coordinator_limit_flags(parser: argparse.ArgumentParser) -> None:
    """The coordinator's limit options (defaults: `CoordinatorLimits()`)."""
    spec, reg = SpecLimits(), RegistrationLimits()
    g = parser.add_argument_group("limits", "bounds against cheap denial of service")
    for flag, default, what in (
        ("--max-spec-bytes", spec.max_bytes, "bytes of a job spec's text"),
        ("--max-spec-depth", spec.max_depth, "levels of nesting in a job spec's YAML"),
        ("--max-spec-nodes", spec.max_nodes, "values in a job spec's YAML"),
        ("--max-batch-size", spec.max_batch_size, "samples in a job's batch"),
        ("--max-micro-batches", spec.max_micro_batches, "micro-batches in a job's step"),
        ("--max-steps", spec.max_steps, "steps of a job"),
        ("--max-model-operators", spec.max_operators, "operators in a job's model"),
        (
            "--registrations-per-minute",
            reg.per_address_per_minute,
            "workers one address registers a minute",
        ),
        ("--max-workers", reg.max_workers, "live workers at once"),
    ):
        g.add_argument(
            flag,
            type=positive_int,
            default=default,
            metavar="N",
            help=f"at most N {what} (default {default})",
        )
    g.add_argument(
        "--max-model-params",
        type=positive_int,
        default=spec.max_parameters,
        metavar="N",
        help=f"at most N parameters in a job's model, e.g. 5e8 (default {spec.max_parameters:.0e})",
    )
    g.add_argument(
        "--max-model-memory-gb",
        type=_gigabytes,
        default=spec.max_memory_bytes / GB,
        metavar="GB",
        help="at most GB of memory to train a job's model in one process, predicted before "
        f"it is built (default {spec.max_memory_bytes / GB:g})",
    )
    g.add_argument(
        "--max-dataset-mb",
        type=positive_int,
        default=DEFAULT_MAX_DATASET_BYTES >> 20,
        metavar="MB",
        help="at most MB MiB in one dataset a user puts (default "
        f"{DEFAULT_MAX_DATASET_BYTES >> 20})",
    )
    add_rpc_limit_flags(g, COORDINATOR_RPC_LIMITS)


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1e-6 <= value < 1e12:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in GB")
    return value


def coordinator_limits_from_flags(args: argparse.Namespace) -> CoordinatorLimits:
    """The limits the coordinator's flags ask for."""
    return CoordinatorLimits(
        spec=SpecLimits(
            max_bytes=args.max_spec_bytes,
            max_depth=args.max_spec_depth,
            max_nodes=args.max_spec_nodes,
            max_batch_size=args.max_batch_size,
            max_micro_batches=args.max_micro_batches,
            max_steps=args.max_steps,
            max_parameters=args.max_model_params,
            max_memory_bytes=int(args.max_model_memory_gb * GB),
            max_operators=args.max_model_operators,
        ),
        rpc=rpc_limits_from_flags(args),
        registration=RegistrationLimits(
            per_address_per_minute=args.registrations_per_minute,
            max_workers=args.max_workers,
        ),
        max_dataset_bytes=args.max_dataset_mb << 20,
    )
