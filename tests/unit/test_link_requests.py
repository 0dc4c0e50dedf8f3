"""A link request's targets are checked before anything is sent: each names a worker (an
id that can name its certificate), an address inside the probe networks, and a ticket of
the coordinator's own form, since the ticket travels on as a probe's header."""

from __future__ import annotations

import pytest

from proto.rpc import parse_networks, ticket
from worker.link_measurement import LinkRequest, LinkTarget
from worker.link_requests import check_link_request

LOCAL = parse_networks(["127.0.0.0/8"], "--probe-networks")


def request(*targets: LinkTarget) -> LinkRequest:
    return LinkRequest(targets=targets, max_bytes=1 << 16, target_seconds=0.05)


def test_a_target_the_coordinator_could_send_passes() -> None:
    good = ticket("k" * 43, "probe", "a1", "b2")
    check_link_request(request(LinkTarget("b2", "127.0.0.1:7100", good)), LOCAL)
    check_link_request(request(LinkTarget("b2", "127.0.0.1:7100")), LOCAL)  # no ticket


@pytest.mark.parametrize(
    "bad",
    ["é" * 4000, "x" * 64, "A" * 64, "0" * 63, "0" * 65, "0" * 32 + "\n" + "0" * 31],
)
def test_a_ticket_not_of_the_coordinators_form_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="is not one the coordinator makes"):
        check_link_request(request(LinkTarget("b2", "127.0.0.1:7100", bad)), LOCAL)


@pytest.mark.parametrize("worker_id", ["", "has space", "a" * 65, "dots.in.it", "é"])
def test_a_target_id_that_names_no_worker_is_refused(worker_id: str) -> None:
    with pytest.raises(ValueError, match="is not a worker id and HOST:PORT"):
        check_link_request(request(LinkTarget(worker_id, "127.0.0.1:7100")), LOCAL)


def test_a_target_outside_the_probe_networks_is_refused() -> None:
    with pytest.raises(PermissionError, match="--probe-networks"):
        check_link_request(request(LinkTarget("b2", "10.0.0.1:7100")), LOCAL)
