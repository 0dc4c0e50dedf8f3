"""The coordinator's requests to measure links from this worker: what one may ask, and the
measurements that answer it.

Plain data and functions of it (the servicer decodes the request and encodes the answer),
so a request's checks run without a network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proto.certificates import CertificateError, worker_name
from proto.cluster_tls import ClientTls
from proto.rpc import ADDRESS_PATTERN, Network, address_in_networks
from worker.link_measurement import LinkFigure, LinkRequest
from worker.link_probe import check_request, measure_link

# Links one request may ask for (each is measured in turn).
MAX_LINK_TARGETS = 64


# A probe ticket is an HMAC-SHA256 hex digest (`proto.rpc.ticket`).
TICKET = re.compile(r"^[0-9a-f]{64}$")


def _names_a_worker(worker_id: str) -> bool:
    """Whether `worker_id` can be a worker's (and name its certificate)."""
    try:
        worker_name(worker_id)
    except CertificateError:
        return False
    return True


def check_link_request(
    request: LinkRequest, networks: Sequence[Network], *, loopback: bool = True
) -> None:
    """Refuse a request this worker will not carry out: ValueError for a malformed one,
    PermissionError for a target outside `networks` (the --probe-networks; none: any).
    Checked in order, so the first problem is the one named."""
    check_request(request.max_bytes, request.target_seconds)
    if len(request.targets) > MAX_LINK_TARGETS:
        raise ValueError(f"at most {MAX_LINK_TARGETS} links may be measured in one call")
    for t in request.targets:
        if not _names_a_worker(t.worker_id) or not ADDRESS_PATTERN.match(t.address):
            raise ValueError(
                f"link target {t.worker_id[:40]!r} at {t.address[:80]!r} is not a worker "
                "id and HOST:PORT"
            )
        # A ticket travels on as a header of the probe: only what the coordinator mints.
        if t.ticket and not TICKET.match(t.ticket):
            raise ValueError(
                f"the probe ticket for link target {t.worker_id!r} is not one the coordinator "
                "makes (64 hex digits)"
            )
        if not address_in_networks(t.address, networks, loopback=loopback):
            raise PermissionError(
                f"link target {t.address[:80]!r} is outside the networks this worker "
                "probes (--probe-networks; without it: no loopback unless this worker "
                "serves there, nor link-local, multicast or reserved addresses)"
            )


async def measure_links(
    request: LinkRequest, *, token: str, tls: ClientTls | None, prober_id: str = ""
) -> list[LinkFigure]:
    """Each requested link measured, in the order asked (a failed one says why)."""
    figures = []
    # One link at a time: concurrent probes from one host would share its uplink.
    for t in request.targets:
        figures.append(
            await measure_link(
                t.worker_id,
                t.address,
                token=token,
                tls=tls,
                max_bytes=request.max_bytes,
                target_seconds=request.target_seconds,
                prober_id=prober_id,
                ticket=t.ticket,
            )
        )
    return figures
