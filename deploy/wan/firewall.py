"""Letting the testbed's traffic through a host firewall that forwards nothing by default.

A Docker engine (and many hardened hosts) sets the root namespace's iptables FORWARD policy
to DROP and makes bridged frames pass through iptables. The testbed's hosts talk through
its bridge, so on such a machine every packet between them would be dropped: each probe
times out and no link is ever measured. When `iptables` is installed, the testbed puts two
rules at the top of FORWARD that accept what enters or leaves its own bridge (only its own
namespaces are on it), each marked with a comment naming the testbed, and removes them
with the testbed. Without `iptables` there is no such firewall to pass.
"""

from __future__ import annotations

import shutil

from deploy.wan import iproute

# `-w`: wait for the xtables lock rather than fail when another tool holds it.
IPTABLES = ("iptables", "-w")


def _comment(testbed: str) -> str:
    return f"archipelago testbed {testbed}"


def _rules(testbed: str, bridge: str) -> list[list[str]]:
    mark = ["-m", "comment", "--comment", _comment(testbed)]
    return [[flag, bridge, *mark, "-j", "ACCEPT"] for flag in ("-i", "-o")]


def open_forwarding(testbed: str, bridge: str) -> None:
    """Accept forwarded traffic in and out of `bridge` (no-op without iptables)."""
    if shutil.which(IPTABLES[0]) is None:
        return
    for rule in _rules(testbed, bridge):
        if iproute.run([*IPTABLES, "-C", "FORWARD", *rule], check=False).returncode != 0:
            iproute.run([*IPTABLES, "-I", "FORWARD", "1", *rule])


def close_forwarding(testbed: str, bridge: str) -> list[str]:
    """Remove the rules `open_forwarding` added (every copy); returns what was removed."""
    if shutil.which(IPTABLES[0]) is None:
        return []
    removed = []
    for rule in _rules(testbed, bridge):
        while iproute.run([*IPTABLES, "-D", "FORWARD", *rule], check=False).returncode == 0:
            removed.append(f"iptables FORWARD rule {' '.join(rule[:2])} ({_comment(testbed)})")
    return removed
