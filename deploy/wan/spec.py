"""The testbed spec: which hosts exist, how they group into regions, and what the links
between them carry. Read from YAML into frozen dataclasses; every field is checked and a
bad one is named (`regions.eu.bandwidth: must be a rate like '100mbit'`).

Rates are bits per second written as `tc` writes them (`500kbit`, `20mbit`, `1gbit`; k, m,
g are powers of 1000). Latencies are one-way durations (`20ms`, `250us`, `0`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from deploy.wan.errors import SpecError

DEFAULT_SUBNET = "10.77.0.0/24"
# Names end up in namespace names (`arch-<name>-<host>`) and file names: keep them plain.
# Host names carry no dash so that a namespace name splits back into testbed and host.
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,22}[a-z0-9])?$")
HOST_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
REGION_PATTERN = HOST_PATTERN
RATE_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
DURATION_PATTERN = re.compile(r"^(\d+(?:\.\d+)?)(s|ms|us)$")
RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
MIN_RATE_BPS = 8_000
MAX_RATE_BPS = 100 * 10**9
MAX_LATENCY_S = 5.0
# The private IPv4 ranges (RFC 1918); loopback and link-local are not offered.
PRIVATE_RANGES = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)

TOP_FIELDS = {"name", "subnet", "regions", "links", "default_bandwidth", "default_latency"}
REGION_FIELDS = {"hosts", "bandwidth"}
LINK_FIELDS = {"between", "bandwidth", "latency"}


@dataclass(frozen=True)
class RegionSpec:
    """One region: its hosts and the bandwidth between any two of them."""

    name: str
    hosts: tuple[str, ...]
    bandwidth_bps: int | None  # None only for a region of one host


@dataclass(frozen=True)
class LinkSpec:
    """What the path between two regions carries, in each direction."""

    regions: tuple[str, str]
    bandwidth_bps: int
    latency_s: float = 0.0


@dataclass(frozen=True)
class PathSpec:
    """What one directed host pair gets: a rate and a one-way latency."""

    bandwidth_bps: int
    latency_s: float


@dataclass(frozen=True)
class TestbedSpec:
    """A whole testbed: name, subnet, regions and the links between them."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    subnet: ipaddress.IPv4Network
    regions: tuple[RegionSpec, ...]
    links: tuple[LinkSpec, ...]
    default_bandwidth_bps: int | None = None
    default_latency_s: float = 0.0

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host, region by region, in the order the spec lists them."""
        return tuple(h for r in self.regions for h in r.hosts)

    def region_of(self, host: str) -> str:
        for region in self.regions:
            if host in region.hosts:
                return region.name
        raise KeyError(f"no host {host!r} in testbed {self.name!r}")

    def link_between(self, a: str, b: str) -> LinkSpec:
        """The link between two different regions (listed, or made of the defaults)."""
        for link in self.links:
            if set(link.regions) == {a, b}:
                return link
        if self.default_bandwidth_bps is None:
            raise KeyError(f"no link between regions {a!r} and {b!r}")
        return LinkSpec((a, b), self.default_bandwidth_bps, self.default_latency_s)

    def path(self, src: str, dst: str) -> PathSpec:
        """Rate and one-way latency from host `src` to host `dst`."""
        if src == dst:
            raise KeyError(f"{src!r} to itself is not a path")
        ra, rb = self.region_of(src), self.region_of(dst)
        if ra == rb:
            bandwidth = next(r.bandwidth_bps for r in self.regions if r.name == ra)
            assert bandwidth is not None  # a region of two or more hosts has one
            return PathSpec(bandwidth, 0.0)
        link = self.link_between(ra, rb)
        return PathSpec(link.bandwidth_bps, link.latency_s)

    @property
    def has_latency(self) -> bool:
        return any(self.path(a, b).latency_s > 0 for a in self.hosts for b in self.hosts if a != b)

    def to_dict(self) -> dict[str, Any]:
        """The spec as YAML-shaped data; `parse_spec(spec.to_dict()) == spec`."""
        out: dict[str, Any] = {"name": self.name, "subnet": str(self.subnet), "regions": {}}
        for r in self.regions:
            region: dict[str, Any] = {"hosts": list(r.hosts)}
            if r.bandwidth_bps is not None:
                region["bandwidth"] = format_rate(r.bandwidth_bps)
            out["regions"][r.name] = region
        out["links"] = [
            {
                "between": list(link.regions),
                "bandwidth": format_rate(link.bandwidth_bps),
                "latency": format_duration(link.latency_s),
            }
            for link in self.links
        ]
        if self.default_bandwidth_bps is not None:
            out["default_bandwidth"] = format_rate(self.default_bandwidth_bps)
        if self.default_latency_s:
            out["default_latency"] = format_duration(self.default_latency_s)
        return out


def format_rate(bps: int) -> str:
    """A rate as `tc` writes it: the largest unit that divides it exactly."""
    for unit in ("gbit", "mbit", "kbit"):
        if bps % RATE_UNITS[unit] == 0:
            return f"{bps // RATE_UNITS[unit]}{unit}"
    return f"{bps}bit"


def format_duration(seconds: float) -> str:
    """A duration in whole microseconds, written in the largest exact unit."""
    us = round(seconds * 1e6)
    if us == 0:
        return "0ms"
    if us % 1000 == 0:
        return f"{us // 1000}ms"
    return f"{us}us"


def load_spec(path: str | Path) -> TestbedSpec:
    """Read and check a testbed spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read the testbed spec: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from None
    return parse_spec(data)


def parse_spec(data: Any) -> TestbedSpec:
    """Check YAML-shaped data field by field and build the spec from it."""
    top = _mapping(data, "spec", TOP_FIELDS)
    name = _name(top.get("name"), "name")
    default_bandwidth = None
    if top.get("default_bandwidth") is not None:
        default_bandwidth = parse_rate(top["default_bandwidth"], "default_bandwidth")
    default_latency = parse_duration(top.get("default_latency", 0), "default_latency")
    if default_latency and default_bandwidth is None:
        raise SpecError("default_latency: needs a default_bandwidth to go with it")
    regions = _regions(top.get("regions"))
    hosts = [h for r in regions for h in r.hosts]
    subnet = _subnet(top.get("subnet", DEFAULT_SUBNET), len(hosts))
    links = _links(top.get("links", []), [r.name for r in regions])
    spec = TestbedSpec(name, subnet, regions, links, default_bandwidth, default_latency)
    for i, a in enumerate(regions):
        for b in regions[i + 1 :]:
            try:
                spec.link_between(a.name, b.name)
            except KeyError:
                raise SpecError(
                    f"links: no link between regions {a.name!r} and {b.name!r} "
                    "(list one, or set default_bandwidth)"
                ) from None
    return spec


def parse_rate(value: Any, where: str) -> int:
    """`20mbit` -> 20_000_000 bits per second."""
    match = RATE_PATTERN.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        raise SpecError(f"{where}: must be a rate like '100mbit' (got {value!r})")
    bps = round(float(match.group(1)) * RATE_UNITS[match.group(2)])
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise SpecError(f"{where}: {value!r} is outside 8kbit..100gbit")
    return bps


def parse_duration(value: Any, where: str) -> float:
    """`20ms` -> 0.02 seconds; a bare 0 is allowed and means none."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0.0
    match = DURATION_PATTERN.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        raise SpecError(f"{where}: must be a duration like '20ms' (got {value!r})")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_LATENCY_S:
        raise SpecError(f"{where}: {value!r} is more than {MAX_LATENCY_S:g} s")
    return seconds


def _mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: must be a mapping (got {type(value).__name__})")
    for key in value:
        if key not in allowed:
            field = key if where == "spec" else f"{where}.{key}"
            raise SpecError(
                f"{field}: unknown field (expected one of {', '.join(sorted(allowed))})"
            )
    return value


def _name(value: Any, where: str) -> str:
    if value is None:
        raise SpecError(f"{where}: required")
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise SpecError(
            f"{where}: must be 1-24 lower-case letters, digits or inner dashes (got {value!r})"
        )
    return value


def _regions(value: Any) -> tuple[RegionSpec, ...]:
    if value is None:
        raise SpecError("regions: required")
    if not isinstance(value, Mapping) or not value:
        raise SpecError("regions: must be a non-empty mapping of region name to {hosts, bandwidth}")
    seen: dict[str, str] = {}  # host -> its region
    regions = []
    for rname, body in value.items():
        where = f"regions.{rname}"
        if not isinstance(rname, str) or not REGION_PATTERN.match(rname):
            raise SpecError(
                f"{where}: a region name must be a lower-case letter, then letters, digits or _"
            )
        body = _mapping(body, where, REGION_FIELDS)
        hosts = body.get("hosts")
        if not isinstance(hosts, list) or not hosts:
            raise SpecError(f"{where}.hosts: must be a non-empty list of host names")
        for i, host in enumerate(hosts):
            hwhere = f"{where}.hosts[{i}]"
            if not isinstance(host, str) or not HOST_PATTERN.match(host):
                raise SpecError(
                    f"{hwhere}: a host name must be a lower-case letter, then up to 15 letters, "
                    f"digits or _ (got {host!r})"
                )
            if host in seen:
                raise SpecError(f"{hwhere}: host {host!r} is already in region {seen[host]!r}")
            seen[host] = rname
        bandwidth = None
        if body.get("bandwidth") is not None:
            bandwidth = parse_rate(body["bandwidth"], f"{where}.bandwidth")
        elif len(hosts) > 1:
            raise SpecError(f"{where}.bandwidth: required for a region of more than one host")
        regions.append(RegionSpec(rname, tuple(hosts), bandwidth))
    return tuple(regions)


def _subnet(value: Any, n_hosts: int) -> ipaddress.IPv4Network:
    where = "subnet"
    try:
        subnet = ipaddress.IPv4Network(value, strict=True) if isinstance(value, str) else None
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None
    if subnet is None:
        raise SpecError(f"{where}: must be an IPv4 network like '10.77.0.0/24' (got {value!r})")
    if not any(subnet.subnet_of(r) for r in PRIVATE_RANGES):
        raise SpecError(
            f"{where}: {subnet} is not inside a private range (10/8, 172.16/12, 192.168/16)"
        )
    # The bridge takes the first address, each host the next; network and broadcast are out.
    if subnet.num_addresses - 3 < n_hosts:
        raise SpecError(f"{where}: {subnet} has no room for {n_hosts} hosts and the bridge")
    return subnet


def _links(value: Any, region_names: list[str]) -> tuple[LinkSpec, ...]:
    if not isinstance(value, list):
        raise SpecError("links: must be a list of {between, bandwidth, latency}")
    links: list[LinkSpec] = []
    first_at: dict[frozenset[str], int] = {}
    for i, body in enumerate(value):
        where = f"links[{i}]"
        body = _mapping(body, where, LINK_FIELDS)
        between = body.get("between")
        if (
            not isinstance(between, list)
            or len(between) != 2
            or not all(isinstance(r, str) for r in between)
        ):
            raise SpecError(f"{where}.between: must be a list of two region names")
        for r in between:
            if r not in region_names:
                raise SpecError(
                    f"{where}.between: no region {r!r} (regions: {', '.join(region_names)})"
                )
        if between[0] == between[1]:
            raise SpecError(
                f"{where}.between: a link joins two different regions; "
                f"the bandwidth inside {between[0]!r} is regions.{between[0]}.bandwidth"
            )
        key = frozenset(between)
        if key in first_at:
            raise SpecError(
                f"{where}.between: {between[0]} and {between[1]} are already linked by "
                f"links[{first_at[key]}]"
            )
        first_at[key] = i
        if body.get("bandwidth") is None:
            raise SpecError(f"{where}.bandwidth: required")
        bandwidth = parse_rate(body["bandwidth"], f"{where}.bandwidth")
        latency = parse_duration(body.get("latency", 0), f"{where}.latency")
        links.append(LinkSpec((between[0], between[1]), bandwidth, latency))
    return tuple(links)
