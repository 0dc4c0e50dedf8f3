"""Which addresses a worker agrees to probe, and which probe sizes it accepts."""

from __future__ import annotations

import pytest

from proto.rpc import address_in_networks as probe_allowed
from proto.rpc import parse_networks as parse
from worker.link_probe import check_request


def parse_networks(items: list[str]) -> tuple:  # type: ignore[type-arg]
    return parse(items, "--probe-networks")

pytestmark = pytest.mark.unit


def test_without_networks_any_address_may_be_probed() -> None:
    assert probe_allowed("worker.example:7100", ())
    assert probe_allowed("203.0.113.7:7100", ())


def test_networks_allow_only_literal_addresses_inside_them() -> None:
    nets = parse_networks(["10.77.0.0/24", "127.0.0.0/8"])
    assert probe_allowed("10.77.0.9:7100", nets)
    assert probe_allowed("127.0.0.1:1", nets)
    assert not probe_allowed("10.77.1.9:7100", nets)
    assert not probe_allowed("localhost:7100", nets)  # names are never looked up
    assert not probe_allowed("[::1]:7100", nets)  # no IPv6 network was allowed
    assert probe_allowed("[::1]:7100", parse_networks(["::1/128"]))


def test_a_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a CIDR block"):
        parse_networks(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("max_bytes", "seconds", "field"),
    [
        (1, 0.2, "max_bytes"),
        (1 << 30, 0.2, "max_bytes"),
        (1 << 20, 0.0, "target_seconds"),
        (1 << 20, float("nan"), "target_seconds"),
        (1 << 20, 60.0, "target_seconds"),
    ],
)
def test_probe_sizes_out_of_bounds_are_refused(max_bytes: int, seconds: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        check_request(max_bytes, seconds)
