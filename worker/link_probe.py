"""Measuring this worker's links to other workers, when the coordinator asks.

The planner needs each directed link's bandwidth and round-trip time. A measurement of the
link from here to a target is a few timed `Probe` calls to the target's own service: empty
ones for the round trip (the smallest of three), then payloads that grow until one takes
about `target_seconds` (or reaches `max_bytes`), so a 10 Gbit/s link and an 8 Mbit/s link
are each measured in well under a second and neither is flooded. Bandwidth is the payload
over the time it took less one round trip (the request's own latency and the empty reply).
"""

from __future__ import annotations

import logging
import math
import time

import grpc

from proto.certificates import CertificateError
from proto.cluster_tls import ClientTls
from proto.rpc import probe_metadata, token_metadata, worker_channel
from worker.link_measurement import LinkFigure
from worker.serde import probe_request_pb, worker_stub

log = logging.getLogger("archipelago.worker")

FIRST_PROBE_BYTES = 64 << 10
RTT_PROBES = 3
# A link that cannot move even the first payload in this long is reported as failed.
PROBE_TIMEOUT_S = 30.0
# Probe sizes the coordinator may ask for: up to 8 MiB per payload, a few seconds each.
MAX_PROBE_PAYLOAD = 8 << 20
MAX_TARGET_SECONDS = 5.0


def check_request(max_bytes: int, target_seconds: float) -> None:
    """Refuse probe sizes a coordinator should never ask for."""
    if not FIRST_PROBE_BYTES <= max_bytes <= MAX_PROBE_PAYLOAD:
        raise ValueError(
            f"max_bytes must be between {FIRST_PROBE_BYTES} and {MAX_PROBE_PAYLOAD}, "
            f"not {max_bytes}"
        )
    if not (math.isfinite(target_seconds) and 0.01 <= target_seconds <= MAX_TARGET_SECONDS):
        raise ValueError(
            f"target_seconds must be between 0.01 and {MAX_TARGET_SECONDS}, not {target_seconds}"
        )


async def measure_link(
    worker_id: str,
    address: str,
    *,
    token: str,
    tls: ClientTls | None,
    max_bytes: int,
    target_seconds: float,
    prober_id: str = "",
    ticket: str = "",
) -> LinkFigure:
    """Round trip and bandwidth from here to the worker at `address`; each probe carries the
    join token and the coordinator's `ticket` for this worker (`prober_id`) to probe it."""
    metadata = token_metadata(token) + probe_metadata(prober_id, ticket)
    try:
        channel = worker_channel(address, tls, worker_id)
    except CertificateError as e:
        return LinkFigure(worker_id, 0.0, 0.0, 0, str(e))
    stub = worker_stub(channel)
    sent = 0

    async def timed(payload: int) -> float:
        nonlocal sent
        began = time.perf_counter()
        await stub.Probe(
            probe_request_pb(payload),
            metadata=metadata,
            timeout=PROBE_TIMEOUT_S,
        )
        sent += payload
        return time.perf_counter() - began

    try:
        await timed(0)  # opens the connection; not counted
        rtt = min([await timed(0) for _ in range(RTT_PROBES)])
        size = FIRST_PROBE_BYTES
        while True:
            took = await timed(size)
            if took >= target_seconds or size >= max_bytes:
                break
            # Aim straight for the target duration, growing at most 8x a round.
            grow = target_seconds / max(took - rtt, 1e-4)
            size = min(max_bytes, int(size * min(8.0, max(2.0, grow))))
        bandwidth = size / max(took - rtt, 1e-6)
        return LinkFigure(worker_id, bandwidth, rtt, sent)
    except grpc.aio.AioRpcError as e:
        log.info("link to %s (%s) not measured: %s", worker_id, address, e.code().name)
        return LinkFigure(worker_id, 0.0, 0.0, sent, f"{e.code().name}: {e.details()}")
    finally:
        await channel.close()
