"""The testbed spec: which hosts exist, how they group into regions, and what the links
between them carry. Read from YAML into frozen dataclasses; every field is checked (by
pydantic models of the YAML's shape) and a bad one is named
(`regions.eu.bandwidth: must be a rate like '100mbit'`).

Rates are bits per second written as `tc` writes them (`500kbit`, `20mbit`, `1gbit`; k, m,
g are powers of 1000). Latencies are one-way durations (`20ms`, `250us`, `0`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainValidator,
    ValidationError,
)

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
    """Check YAML-shaped data field by field, then the rules between fields, and build the
    spec from it."""
    try:
        doc = _Document.model_validate(data)
    except ValidationError as e:
        raise _spec_error(e) from None
    _check_consistent(doc)
    regions = tuple(RegionSpec(n, tuple(r.hosts), r.bandwidth) for n, r in doc.regions.items())
    links = tuple(LinkSpec(x.between, x.bandwidth, x.latency) for x in doc.links)
    return TestbedSpec(
        doc.name, doc.subnet, regions, links, doc.default_bandwidth, doc.default_latency
    )


def parse_rate(value: Any, where: str) -> int:
    """`20mbit` -> 20_000_000 bits per second."""
    return _named(_rate, value, where)


def parse_duration(value: Any, where: str) -> float:
    """`20ms` -> 0.02 seconds; a bare 0 is allowed and means none."""
    return _named(_duration, value, where)


# -- the YAML's shape, checked by pydantic -----------------------------------------------

_T = TypeVar("_T")


def _named(check: Callable[[Any], _T], value: Any, where: str) -> _T:
    try:
        return check(value)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def _spec_error(error: ValidationError) -> SpecError:
    """pydantic's first error as `regions.eu.hosts[0]: what is wrong`."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    # "[key]" marks an error about a mapping's key rather than its value.
    loc = [p for p in first["loc"] if p != "[key]"]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if first["type"] == "missing":
        message = "required"
    elif first["type"] == "extra_forbidden":
        # The only mappings below the top are regions' bodies and links.
        form = _Document if len(loc) == 1 else _Region if loc[0] == "regions" else _Link
        message = f"unknown field (expected one of {', '.join(sorted(form.model_fields))})"
    elif first["type"] == "model_type":
        message = f"must be a mapping (got {type(first['input']).__name__})"
    else:
        message = str(cause) if isinstance(cause, Exception) else first["msg"]
    return SpecError(f"{where or 'spec'}: {message}")


def _rate(value: Any) -> int:
    match = RATE_PATTERN.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a rate like '100mbit' (got {value!r})")
    bps = round(float(match.group(1)) * RATE_UNITS[match.group(2)])
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise ValueError(f"{value!r} is outside 8kbit..100gbit")
    return bps


def _duration(value: Any) -> float:
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0.0
    match = DURATION_PATTERN.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a duration like '20ms' (got {value!r})")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_LATENCY_S:
        raise ValueError(f"{value!r} is more than {MAX_LATENCY_S:g} s")
    return seconds


def _subnet(value: Any) -> ipaddress.IPv4Network:
    subnet = ipaddress.IPv4Network(value, strict=True) if isinstance(value, str) else None
    if subnet is None:
        raise ValueError(f"must be an IPv4 network like '10.77.0.0/24' (got {value!r})")
    if not any(subnet.subnet_of(r) for r in PRIVATE_RANGES):
        raise ValueError(f"{subnet} is not inside a private range (10/8, 172.16/12, 192.168/16)")
    return subnet


def _two_regions(value: Any) -> tuple[str, str]:
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(r, str) for r in value):
        raise ValueError("must be a list of two region names")
    if value[0] == value[1]:
        raise ValueError(
            f"a link joins two different regions; "
            f"the bandwidth inside {value[0]!r} is regions.{value[0]}.bandwidth"
        )
    return value[0], value[1]


def _matching(pattern: re.Pattern[str], rule: str) -> PlainValidator:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"{rule} (got {value!r})")
        return value

    return PlainValidator(check)


def _shaped(kind: type, rule: str, *, empty: bool = False) -> BeforeValidator:
    def check(value: Any) -> Any:
        if not isinstance(value, kind) or not (value or empty):
            raise ValueError(rule)
        return value

    return BeforeValidator(check)


Rate = Annotated[int, PlainValidator(_rate)]
RateOrNone = Annotated[int | None, PlainValidator(lambda v: None if v is None else _rate(v))]
Duration = Annotated[float, PlainValidator(_duration)]
_HOST_RULE = "a host name must be a lower-case letter, then up to 15 letters, digits or _"
_REGION_RULE = "a region name must be a lower-case letter, then letters, digits or _"
_NAME_RULE = "must be 1-24 lower-case letters, digits or inner dashes"


class _Form(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Region(_Form):
    hosts: Annotated[
        list[Annotated[str, _matching(HOST_PATTERN, _HOST_RULE)]],
        _shaped(list, "must be a non-empty list of host names"),
    ]
    bandwidth: RateOrNone = None


class _Link(_Form):
    between: Annotated[tuple[str, str], PlainValidator(_two_regions)]
    bandwidth: Rate
    latency: Duration = 0.0


class _Document(_Form):
    name: Annotated[str, _matching(NAME_PATTERN, _NAME_RULE)]
    subnet: Annotated[ipaddress.IPv4Network, PlainValidator(_subnet)] = ipaddress.IPv4Network(
        DEFAULT_SUBNET
    )
    regions: Annotated[
        dict[Annotated[str, _matching(REGION_PATTERN, _REGION_RULE)], _Region],
        _shaped(dict, "must be a non-empty mapping of region name to {hosts, bandwidth}"),
    ]
    links: Annotated[
        list[_Link], _shaped(list, "must be a list of {between, bandwidth, latency}", empty=True)
    ] = []
    default_bandwidth: RateOrNone = None
    default_latency: Duration = 0.0


def _check_consistent(doc: _Document) -> None:
    """The rules between fields: a rate inside each region of several hosts, hosts in one
    region each and room for them in the subnet, links between regions that exist, one a
    pair, and a rate for every pair of regions."""
    if doc.default_latency and doc.default_bandwidth is None:
        raise SpecError("default_latency: needs a default_bandwidth to go with it")
    seen: dict[str, str] = {}  # host -> its region
    for rname, region in doc.regions.items():
        for i, host in enumerate(region.hosts):
            if host in seen:
                where = f"regions.{rname}.hosts[{i}]"
                raise SpecError(f"{where}: host {host!r} is already in region {seen[host]!r}")
            seen[host] = rname
        if region.bandwidth is None and len(region.hosts) > 1:
            where = f"regions.{rname}.bandwidth"
            raise SpecError(f"{where}: required for a region of more than one host")
    # The bridge takes the first address, each host the next; network and broadcast are out.
    if doc.subnet.num_addresses - 3 < len(seen):
        raise SpecError(f"subnet: {doc.subnet} has no room for {len(seen)} hosts and the bridge")
    names = list(doc.regions)
    first_at: dict[frozenset[str], int] = {}
    for i, link in enumerate(doc.links):
        pair, (a, b) = frozenset(link.between), link.between
        for r in (a, b):
            if r not in names:
                raise SpecError(
                    f"links[{i}].between: no region {r!r} (regions: {', '.join(names)})"
                )
        if pair in first_at:
            raise SpecError(
                f"links[{i}].between: {a} and {b} are already linked by links[{first_at[pair]}]"
            )
        first_at[pair] = i
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if frozenset((a, b)) not in first_at and doc.default_bandwidth is None:
                raise SpecError(
                    f"links: no link between regions {a!r} and {b!r} "
                    "(list one, or set default_bandwidth)"
                )
