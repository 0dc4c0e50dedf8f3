"""A testbed host behind NAT, as a volunteer's home machine is: it can open connections to
anyone, but no one can open one to it. Inside the host's own namespace, new TCP connections
from outside (a SYN without ACK, not on loopback) are dropped; replies to the host's own
connections pass. The rule lives in the namespace and goes with it when the testbed does."""

from __future__ import annotations

import shutil

from deploy.wan import iproute
from deploy.wan.errors import TestbedError
from deploy.wan.firewall import IPTABLES

# Loopback stays open: the host's own processes still reach each other.
DROP_INBOUND = ["INPUT", "!", "-i", "lo", "-p", "tcp", "--syn", "-j", "DROP"]


def nat_unavailable() -> str | None:
    """Why a host cannot be put behind NAT here (None when it can)."""
    if shutil.which(IPTABLES[0]) is None:
        return "iptables is not on PATH"
    return None


def drop_inbound(namespace: str) -> None:
    """Drop every new inbound TCP connection to the host of `namespace`."""
    why = nat_unavailable()
    if why is not None:
        raise TestbedError(f"cannot put {namespace} behind NAT: {why}")
    iproute.run(["ip", "netns", "exec", namespace, *IPTABLES, "-A", *DROP_INBOUND])


def allow_inbound(namespace: str) -> None:
    """Undo `drop_inbound` (the host takes inbound connections again)."""
    iproute.run(["ip", "netns", "exec", namespace, *IPTABLES, "-D", *DROP_INBOUND])
