"""Which addresses a worker agrees to probe, and which probe sizes it accepts."""

from __future__ import annotations

import pytest

from proto.rpc import address_in_networks as probe_allowed
from proto.rpc import parse_networks as parse
from proto.rpc import serves_loopback
from worker.link_probe import check_request


def parse_networks(items: list[str]) -> tuple:  # type: ignore[type-arg]
    return parse(items, "--probe-networks")


pytestmark = pytest.mark.unit


def test_without_networks_any_address_a_worker_can_have_may_be_probed() -> None:
    assert probe_allowed("worker.example:7100", ())
    assert probe_allowed("203.0.113.7:7100", ())
    assert probe_allowed("10.1.2.3:7100", ())  # an island's private network
    assert probe_allowed("127.0.0.1:7100", ())  # the caller serves loopback (the default)


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254:80",  # a cloud's metadata service
        "[fe80::1]:7100",
        "224.0.0.1:7100",
        "0.0.0.0:7100",
        "[::]:7100",
        "240.0.0.1:7100",
    ],
)
def test_without_networks_no_address_of_no_worker_may_be(address: str) -> None:
    assert not probe_allowed(address, ())


def test_loopback_only_for_a_caller_that_serves_there() -> None:
    for address in ("127.0.0.1:6379", "127.9.9.9:1", "[::1]:7100", "[::ffff:127.0.0.1]:1"):
        assert probe_allowed(address, (), loopback=True), address
        assert not probe_allowed(address, (), loopback=False), address
    assert not probe_allowed("localhost:6379", (), loopback=False)
    assert probe_allowed("localhost:6379", (), loopback=True)
    # Networks given: they alone decide.
    assert probe_allowed("127.0.0.1:1", parse_networks(["127.0.0.0/8"]), loopback=False)


@pytest.mark.parametrize(
    ("host", "serves"),
    [("127.0.0.1", True), ("0.0.0.0", True), ("[::]", True), ("localhost", True),
     ("10.0.0.4", False), ("worker.example", False)],
)  # fmt: skip
def test_who_serves_loopback(host: str, serves: bool) -> None:
    assert serves_loopback(host) is serves


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


def test_a_coordinator_off_loopback_admits_no_worker_there_by_default() -> None:
    from coordinator.worker_admission import Registration, check_registration

    def at(address: str) -> Registration:
        return Registration("w", address, 1.0, 1 << 30, "cpu", 1)

    with pytest.raises(PermissionError, match="is no volunteer's"):
        check_registration(at("127.0.0.1:6379"), (), loopback=False)
    with pytest.raises(PermissionError, match="is no volunteer's"):
        check_registration(at("169.254.169.254:80"), ())
    check_registration(at("127.0.0.1:7100"), ())  # a coordinator that serves loopback
    check_registration(at("198.51.100.4:7100"), (), loopback=False)
