"""The `tc` and `ip` commands that shape one host's egress, as plain argv lists.

Each host shapes what it sends, per destination: an `htb` qdisc with one class per
destination host (rate = ceil = the spec's bandwidth for that pair), chosen by a `u32`
filter on the destination address. Because every host does this, every directed pair is
shaped. Traffic that matches no filter (to the bridge address, ARP) falls into a default
class with a rate far above any link.

Paths with latency do not leave through the veth: a /32 route sends them into the host's
tunnel device `wan0`, whose `htb` shapes them the same way, and the delay layer
(`deploy.wan.delay`) holds each packet for the one-way latency before it hands it to the
destination's tunnel. Shaping first and delaying after is what a real link does: packets
queue at the bottleneck, then travel.
"""

from __future__ import annotations

from dataclasses import dataclass

from deploy.wan.layout import INNER_VETH, TUNNEL, HostLayout, TestbedLayout
from deploy.wan.spec import TestbedSpec

DEFAULT_CLASS_RATE_BPS = 10 * 10**9  # traffic the spec does not describe is not held back
DEFAULT_MINOR = 0xFFFF
ETHERNET_HEADER = 14
ETHERNET_MTU = 1500
MAX_TUNNEL_MTU = 65000
# One packet on a delayed path takes at most this long to serialise at the path's rate, so
# larger packets do not make latency lumpy; on fast paths they keep the user-space delay
# layer's packet rate low.
MAX_PACKET_TIME_S = 0.0005
# The htb bucket holds this much time of traffic: enough that timer granularity does not
# cost throughput, small enough that a burst stays a burst.
BURST_TIME_S = 0.002
MIN_BURST_BYTES = 16 * 1024
MAX_QUANTUM_BYTES = 200_000  # htb warns above this


@dataclass(frozen=True)
class ShapedPath:
    """One directed path out of a host, as the host's egress shaping sees it."""

    dst: HostLayout
    rate_bps: int
    latency_s: float
    minor: int  # the htb class id's minor number

    @property
    def device(self) -> str:
        return TUNNEL if self.latency_s > 0 else INNER_VETH

    @property
    def mtu(self) -> int:
        """The packet size on this path: Ethernet's, or larger on fast delayed paths."""
        if self.latency_s <= 0:
            return ETHERNET_MTU
        wanted = int(self.rate_bps / 8 * MAX_PACKET_TIME_S)
        return max(ETHERNET_MTU, min(MAX_TUNNEL_MTU, wanted))


def paths_from(spec: TestbedSpec, layout: TestbedLayout, host: str) -> list[ShapedPath]:
    """Every path leaving `host`, one per other host, with its htb class number."""
    out = []
    for dst in layout.hosts:
        if dst.name == host:
            continue
        path = spec.path(host, dst.name)
        out.append(ShapedPath(dst, path.bandwidth_bps, path.latency_s, 0x10 + dst.index))
    return out


def burst_bytes(rate_bps: int, packet_bytes: int) -> int:
    return max(int(rate_bps / 8 * BURST_TIME_S), 2 * packet_bytes, MIN_BURST_BYTES)


def quantum_bytes(rate_bps: int, packet_bytes: int) -> int:
    # With ceil = rate no class borrows, so the quantum only has to be legal and quiet.
    return max(packet_bytes, min(MAX_QUANTUM_BYTES, rate_bps // 8 // 10))


def htb_commands(namespace: str, device: str, paths: list[ShapedPath]) -> list[list[str]]:
    """`tc` argv lists that put an htb with one class per path on `device`."""
    tc = ["tc", "-n", namespace]
    cmds = [
        [*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb",
         "default", f"{DEFAULT_MINOR:x}"],
        _class(tc, device, DEFAULT_MINOR, DEFAULT_CLASS_RATE_BPS, ETHERNET_MTU + ETHERNET_HEADER),
    ]  # fmt: skip
    for p in paths:
        cmds.append(_class(tc, device, p.minor, p.rate_bps, p.mtu + ETHERNET_HEADER))
        cmds.append(
            [*tc, "filter", "add", "dev", device, "parent", "1:", "protocol", "ip", "prio", "1",
             "u32", "match", "ip", "dst", f"{p.dst.address}/32", "flowid", f"1:{p.minor:x}"]
        )  # fmt: skip
    return cmds


def _class(tc: list[str], device: str, minor: int, rate_bps: int, packet: int) -> list[str]:
    rate = f"{rate_bps}bit"
    burst = str(burst_bytes(rate_bps, packet))
    return [
        *tc, "class", "add", "dev", device, "parent", "1:", "classid", f"1:{minor:x}",
        "htb", "rate", rate, "ceil", rate, "burst", burst, "cburst", burst,
        "quantum", str(quantum_bytes(rate_bps, packet)),
    ]  # fmt: skip


def tunnel_commands(host: HostLayout, paths: list[ShapedPath]) -> list[list[str]]:
    """`ip` argv lists that make the tunnel device and route the delayed paths into it."""
    delayed = [p for p in paths if p.latency_s > 0]
    if not delayed:
        return []
    ip = ["ip", "-n", host.namespace]
    mtu = max(p.mtu for p in delayed)
    cmds = [
        [*ip, "tuntap", "add", "dev", TUNNEL, "mode", "tun"],
        [*ip, "link", "set", "dev", TUNNEL, "mtu", str(mtu), "up"],
    ]
    for p in delayed:
        cmds.append(
            [*ip, "route", "add", f"{p.dst.address}/32", "dev", TUNNEL, "src", str(host.address),
             "mtu", str(p.mtu), "advmss", str(p.mtu - 40)]
        )  # fmt: skip
    return cmds


def shaping_commands(spec: TestbedSpec, layout: TestbedLayout, host: str) -> list[list[str]]:
    """Everything that shapes (and, for delayed paths, routes) one host's egress."""
    hl = layout.host(host)
    paths = paths_from(spec, layout, host)
    cmds = tunnel_commands(hl, paths)
    for device in (INNER_VETH, TUNNEL):
        on_device = [p for p in paths if p.device == device]
        # The veth always gets its htb (the default class); the tunnel only if it exists.
        if on_device or device == INNER_VETH:
            cmds += htb_commands(hl.namespace, device, on_device)
    return cmds
