"""Where a testbed's pieces live: namespace and interface names, addresses. Pure data built
from a spec, so names can be checked without root and found again by `testbed down`.

Every name carries a prefix that is the testbed's own: namespaces are `arch-<name>-<host>`;
root-namespace interfaces (limited to 15 characters) are `arw-<tag>` for the bridge and
`arw-<tag>-<i>` for the outer end of host i's veth, where `<tag>` is a short hash of the
testbed name. Inside a namespace the names are fixed: `eth0` (the veth) and `wan0` (the
tunnel of the delay layer, only where some path has latency).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from deploy.wan.spec import TestbedSpec

NAMESPACE_PREFIX = "arch-"
LINK_PREFIX = "arw-"
INNER_VETH = "eth0"
TUNNEL = "wan0"


@dataclass(frozen=True)
class HostLayout:
    """One host: its namespace, its address, and the root-namespace end of its veth."""

    name: str
    region: str
    index: int
    namespace: str
    address: ipaddress.IPv4Address
    outer_veth: str


@dataclass(frozen=True)
class TestbedLayout:
    """All names and addresses of one testbed."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str
    bridge_address: ipaddress.IPv4Address
    hosts: tuple[HostLayout, ...]

    def host(self, name: str) -> HostLayout:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in testbed {self.name!r}")

    @property
    def interface_cidr(self) -> str:
        """The bridge's address with the subnet's prefix length, as `ip addr` takes it."""
        return f"{self.bridge_address}/{self.subnet.prefixlen}"


def link_tag(name: str) -> str:
    """Six hex digits naming the testbed in interface names (which hold 15 characters)."""
    return hashlib.sha1(name.encode()).hexdigest()[:6]


def namespace_name(testbed: str, host: str) -> str:
    return f"{NAMESPACE_PREFIX}{testbed}-{host}"


def owner_of_namespace(namespace: str) -> str | None:
    """The testbed a namespace belongs to, or None if it is not one of ours.

    Host names hold no dash, so the last dash separates the testbed name from the host.
    """
    if not namespace.startswith(NAMESPACE_PREFIX):
        return None
    testbed, sep, host = namespace[len(NAMESPACE_PREFIX) :].rpartition("-")
    return testbed if sep and testbed and host else None


def bridge_name(testbed: str) -> str:
    return f"{LINK_PREFIX}{link_tag(testbed)}"


def plan_layout(spec: TestbedSpec) -> TestbedLayout:
    """Names and addresses for every host of `spec`: the bridge is .1, hosts .2, .3, ..."""
    first = spec.subnet.network_address
    bridge = bridge_name(spec.name)
    hosts = tuple(
        HostLayout(
            name=host,
            region=spec.region_of(host),
            index=i,
            namespace=namespace_name(spec.name, host),
            address=first + 2 + i,
            outer_veth=f"{bridge}-{i}",
        )
        for i, host in enumerate(spec.hosts)
    )
    return TestbedLayout(spec.name, spec.subnet, bridge, first + 1, hosts)
