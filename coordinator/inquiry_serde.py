"""The coordinator's questions to a worker beyond running its stage, on the wire: a link
measurement (`coordinator.link_survey`), and a spot check's request for a stage's evidence
of one micro-batch with the header of its answer (`coordinator.spot_checks`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from proto import worker_pb2
from proto.streams import IncomingTensors, open_stream


@dataclass(frozen=True)
class SpotEvidenceHeader:
    """Which stage, step and micro-batch a SpotEvidence answer says it is of."""

    job_id: str
    epoch: int
    stage: int
    step: int
    micro_batch: int


def spot_request_pb(
    job_id: str, epoch: int, step: int, micro_batch: int, *, params: bool, gradients: bool
) -> worker_pb2.SpotRequest:
    return worker_pb2.SpotRequest(
        job_id=job_id,
        epoch=epoch,
        step=step,
        micro_batch=micro_batch,
        params=params,
        gradients=gradients,
    )


async def open_spot_evidence(
    parts: AsyncIterator[Any],
) -> tuple[SpotEvidenceHeader, IncomingTensors]:
    """A SpotEvidence answer's header and its tensors, still to be read (and bounded)."""
    h, incoming = await open_stream(parts, "header")
    return SpotEvidenceHeader(h.job_id, h.epoch, h.stage, h.step, h.micro_batch), incoming


def measure_link_pb(
    target_id: str,
    target_address: str,
    *,
    max_bytes: int,
    target_seconds: float,
    ticket: str = "",
) -> worker_pb2.MeasureLinksRequest:
    """Ask a worker to measure its link to one other (`ticket`: what lets it probe there)."""
    return worker_pb2.MeasureLinksRequest(
        targets=[worker_pb2.LinkTarget(worker_id=target_id, address=target_address, ticket=ticket)],
        max_bytes=max_bytes,
        target_seconds=target_seconds,
    )


@dataclass(frozen=True)
class MeasuredLink:
    """A worker's answer for one link: the target, bytes/s, round trip, or why it failed."""

    worker_id: str
    bandwidth: float
    rtt_s: float
    error: str


def measured_links_from_pb(reply: worker_pb2.MeasureLinksReply) -> list[MeasuredLink]:
    return [MeasuredLink(m.worker_id, m.bandwidth, m.rtt_s, m.error) for m in reply.links]
