"""The testbed's only door to the kernel: running `ip` and `tc`, and reading back what
namespaces, interfaces, addresses and routes exist. A failed command becomes a
`TestbedError` that quotes the command and what it printed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from deploy.wan.errors import TestbedError

COMMAND_TIMEOUT_S = 20.0


def require_privileges() -> None:
    """Refuse early, with a clear reason, where the testbed cannot be built at all."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise TestbedError(
            f"the WAN testbed needs {' and '.join(missing)} (iproute2) on PATH; "
            "install it, e.g. apt-get install iproute2"
        )
    if os.geteuid() != 0:
        raise TestbedError(
            "the WAN testbed needs root to create network namespaces and shape links "
            "(run it with sudo, or as root)"
        )


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command; on failure (and `check`) raise with its command line and stderr."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise TestbedError(f"`{argv[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(
            f"`{shlex.join(argv)}` did not finish in {COMMAND_TIMEOUT_S:g} s"
        ) from None
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
        raise TestbedError(f"`{shlex.join(argv)}` failed: {detail}")
    return done


def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    out = run(argv).stdout.strip()
    # `ip -j netns list` prints nothing at all when there are no namespaces.
    return json.loads(out) if out else []


def namespaces() -> list[str]:
    """Names of the network namespaces `ip netns` knows."""
    return [entry["name"] for entry in _json(["ip", "-j", "netns", "list"])]


def links() -> list[str]:
    """Names of the interfaces in the root namespace."""
    return [entry["ifname"] for entry in _json(["ip", "-j", "link", "show"])]


def subnet_users(subnet: ipaddress.IPv4Network) -> list[str]:
    """Addresses and routes of the root namespace that overlap `subnet`, described."""
    found: list[str] = []
    for entry in _json(["ip", "-j", "-4", "addr", "show"]):
        for info in entry.get("addr_info", []):
            net = ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            if net.overlaps(subnet):
                found.append(f"address {info['local']}/{info['prefixlen']} on {entry['ifname']}")
    for entry in _json(["ip", "-j", "-4", "route", "show", "table", "all"]):
        dst = entry.get("dst", "")
        if dst == "default":
            continue
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        # A default-free route wider than the subnet (say 10.0.0.0/8) also claims it.
        if net.overlaps(subnet) and entry.get("type", "unicast") == "unicast":
            found.append(f"route {dst} via {entry.get('dev', '?')}")
    return found


def namespace_pids(namespace: str) -> list[int]:
    """Processes running inside a namespace (they keep it alive after `ip netns del`)."""
    done = run(["ip", "netns", "pids", namespace], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]
