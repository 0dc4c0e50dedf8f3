"""Link measurement as plain data: what the coordinator asks a worker to measure, and the
figures the worker measured. Shared by the probe, the request checks and the serde."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkTarget:
    """A worker to measure the link to, by id and address, with the coordinator's ticket
    that lets this worker probe it."""

    worker_id: str
    address: str
    ticket: str = ""


@dataclass(frozen=True)
class LinkRequest:
    """Which links to measure, and how hard to probe each."""

    targets: tuple[LinkTarget, ...]
    max_bytes: int
    target_seconds: float


@dataclass(frozen=True)
class LinkFigure:
    """One measured link from this worker."""

    worker_id: str
    bandwidth: float  # bytes per second
    rtt_s: float
    nbytes: int  # bytes sent to measure it
    error: str = ""
