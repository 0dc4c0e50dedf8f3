"""The delay layer: adds one-way latency to the testbed's paths, since this kernel has no
`netem`.

One process per testbed, in the root namespace, holds the tunnel device `wan0` of every
host that has a delayed path. A host's kernel routes packets for delayed destinations into
its `wan0`, shaped there by `htb`; this process reads each packet, keeps it for the
one-way latency of its (source, destination) pair and then writes it into the
destination host's `wan0`, where that host's kernel receives it as if it came off a wire.
Packets never leave the kernel's view of the testbed's addresses, and nothing is
rewritten.

If this process dies the tunnels lose their reader and delayed paths stop carrying
traffic: a broken delay layer is loud, never a silently undelayed link.

Run as `python -m deploy.wan.delay --testbed NAME [--die-with-parent]` with its
configuration as JSON on stdin; it prints `ready` once every tunnel is attached.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import ipaddress
import json
import os
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
PR_SET_PDEATHSIG = 1
READ_SIZE = 65536
READS_PER_WAKE = 256  # per tunnel, so one busy host cannot starve the release of others
# Packets held at once, in bytes: a router's buffer. The htb in front of every tunnel
# already bounds this to rate x latency per path; the cap only guards against a runaway.
MAX_HELD_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TunnelConfig:
    """One host's tunnel: the namespace it lives in and the host's address."""

    namespace: str
    device: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class DelayConfig:
    """What the delay layer needs: the tunnels and the one-way delay of each pair."""

    tunnels: tuple[TunnelConfig, ...]
    delays: dict[tuple[ipaddress.IPv4Address, ipaddress.IPv4Address], float]

    def to_json(self) -> str:
        return json.dumps(
            {
                "tunnels": [
                    {"namespace": t.namespace, "device": t.device, "address": str(t.address)}
                    for t in self.tunnels
                ],
                "delays": [[str(s), str(d), v] for (s, d), v in self.delays.items()],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DelayConfig:
        data: dict[str, Any] = json.loads(text)
        tunnels = tuple(
            TunnelConfig(t["namespace"], t["device"], ipaddress.IPv4Address(t["address"]))
            for t in data["tunnels"]
        )
        delays = {
            (ipaddress.IPv4Address(s), ipaddress.IPv4Address(d)): float(v)
            for s, d, v in data["delays"]
        }
        return cls(tunnels, delays)


_libc = ctypes.CDLL(None, use_errno=True)


def _enter_namespace(path: str) -> None:
    # Python 3.11 has no os.setns; the libc call moves this (single) thread.
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def attach_tunnel(namespace: str, device: str) -> int:
    """Open the persistent tun device `device` inside `namespace`; returns its descriptor.

    The device stays in its namespace; the descriptor works from anywhere.
    """
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        _enter_namespace(f"/run/netns/{namespace}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            ifreq = struct.pack("16sH", device.encode(), IFF_TUN | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the root namespace")
    finally:
        os.close(home)
    return fd


class DelayLine:
    """Packets in flight: each waits for its release time, then goes to its tunnel."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._seq = 0  # keeps equal release times in arrival order
        self.held_bytes = 0
        self.forwarded = 0
        self.dropped = 0

    def hold(self, release_at: float, dst_fd: int, packet: bytes) -> None:
        if self.held_bytes + len(packet) > MAX_HELD_BYTES:
            self.dropped += 1
            return
        self._seq += 1
        heapq.heappush(self._heap, (release_at, self._seq, dst_fd, packet))
        self.held_bytes += len(packet)

    def next_release(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def release_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, dst_fd, packet = heapq.heappop(heap)
            self.held_bytes -= len(packet)
            try:
                os.write(dst_fd, packet)
                self.forwarded += 1
            except OSError:
                self.dropped += 1  # the destination's tunnel is down: the packet is lost


def serve(config: DelayConfig, ready: Any) -> None:
    """Attach every tunnel, say `ready`, then move packets until killed."""
    fds: dict[int, ipaddress.IPv4Address] = {}
    fd_of: dict[bytes, int] = {}
    for t in config.tunnels:
        fd = attach_tunnel(t.namespace, t.device)
        fds[fd] = t.address
        fd_of[t.address.packed] = fd
    # Per source tunnel: destination address (as it appears in the header) -> (tunnel, delay).
    routes: dict[int, dict[bytes, tuple[int, float]]] = {fd: {} for fd in fds}
    for (src, dst), seconds in config.delays.items():
        routes[fd_of[src.packed]][dst.packed] = (fd_of[dst.packed], seconds)
    print("ready", file=ready, flush=True)
    ready.close()

    line = DelayLine()
    readable = list(fds)
    while True:
        due = line.next_release()
        timeout = None if due is None else max(0.0, due - time.monotonic())
        ready_fds, _, _ = select.select(readable, [], [], timeout)
        now = time.monotonic()
        for fd in ready_fds:
            table = routes[fd]
            for _ in range(READS_PER_WAKE):
                try:
                    packet = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                # IPv4 only: the version nibble, then the destination at bytes 16-19.
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    continue
                target = table.get(packet[16:20])
                if target is None:
                    continue  # not a testbed path: nothing to deliver it to
                line.hold(now + target[1], target[0], packet)
        line.release_due(time.monotonic())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.wan.delay")
    parser.add_argument("--testbed", required=True, help="the testbed this layer serves")
    parser.add_argument("--die-with-parent", action="store_true")
    args = parser.parse_args(argv)
    if args.die_with_parent:
        # A testbed built in-process takes its delay layer with it, even on SIGKILL.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:
            return 1  # the parent is already gone
    # Ctrl-C belongs to whoever runs the testbed; it stops this process when it cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = DelayConfig.from_json(sys.stdin.read())
    ready = os.fdopen(os.dup(1), "w")
    # Nobody reads stdout after `ready`; keep later writes from failing on a closed pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    serve(config, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
