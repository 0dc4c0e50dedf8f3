"""Finding and removing what a testbed made: its delay layer, the processes inside its
namespaces, its veths and bridge, its namespaces and its record. Everything is found by
the testbed's own name prefixes, so this works on the leftovers of a run that crashed.
Removing is idempotent: what is already gone is skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from deploy.wan import firewall, iproute
from deploy.wan.errors import TestbedError
from deploy.wan.layout import LINK_PREFIX, NAMESPACE_PREFIX, bridge_name, owner_of_namespace
from deploy.wan.state import STATE_DIR, read_state, recorded_names, remove_records, state_path

STOP_GRACE_S = 2.0
DELAY_MODULE = "deploy.wan.delay"


def _namespaces_of(name: str) -> list[str]:
    return [n for n in iproute.namespaces() if owner_of_namespace(n) == name]


def _links_of(name: str) -> list[str]:
    bridge = bridge_name(name)
    return [link for link in iproute.links() if link == bridge or link.startswith(bridge + "-")]


def leftovers(name: str, directory: Path = STATE_DIR) -> list[str]:
    """What of testbed `name` exists now, described; empty if nothing does."""
    found = [f"namespace {n}" for n in _namespaces_of(name)]
    found += [f"interface {link}" for link in _links_of(name)]
    if state_path(name, directory).exists():
        found.append(f"record {state_path(name, directory)}")
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state letter follows the parenthesised command name; Z is a zombie.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def stop_process(pid: int, grace_s: float = STOP_GRACE_S) -> bool:
    """SIGTERM, then SIGKILL after `grace_s`; True if it was running."""
    if pid == os.getpid() or not _alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while _alive(pid) and time.monotonic() < deadline + grace_s:
            time.sleep(0.02)
    return True


def _is_delay_layer(pid: int, name: str) -> bool:
    # A recorded pid may have been reused by now: only stop it if it still is our layer.
    args = _cmdline(pid)
    return DELAY_MODULE in args and "--testbed" in args and name in args


def remove_testbed(name: str, directory: Path = STATE_DIR) -> list[str]:
    """Remove every piece of testbed `name` that exists; returns what was removed."""
    removed: list[str] = []
    try:
        record = read_state(name, directory)
    except TestbedError:
        record = None  # a corrupt record names nothing; the prefixes still find the rest
    delay_pid = record.delay_pid if record else None
    if delay_pid and _is_delay_layer(delay_pid, name) and stop_process(delay_pid):
        removed.append(f"delay layer (pid {delay_pid})")
    namespaces = _namespaces_of(name)
    for ns in namespaces:
        # A process left inside keeps the namespace, and with it the veth, alive.
        for pid in iproute.namespace_pids(ns):
            if stop_process(pid):
                removed.append(f"process {pid} in {ns}")
    bridge = bridge_name(name)
    removed += firewall.close_forwarding(name, bridge)
    # Veths before the bridge; deleting an outer end takes its peer in the namespace along.
    for link in sorted(_links_of(name), key=lambda link: link == bridge):
        if iproute.run(["ip", "link", "del", "dev", link], check=False).returncode == 0:
            removed.append(f"interface {link}")
    for ns in namespaces:
        if iproute.run(["ip", "netns", "del", ns], check=False).returncode == 0:
            removed.append(f"namespace {ns}")
    removed += [f"record {p}" for p in remove_records(name, directory)]
    still = [x for x in leftovers(name, directory) if not x.startswith("record")]
    if still:
        raise TestbedError(f"could not remove all of testbed {name!r}: {', '.join(still)} remain")
    return removed


def remove_all(directory: Path = STATE_DIR) -> list[str]:
    """Remove every testbed that has a record or a namespace with the testbed prefix."""
    names = set(recorded_names(directory))
    names |= {t for n in iproute.namespaces() if (t := owner_of_namespace(n)) is not None}
    removed: list[str] = []
    for name in sorted(names):
        removed += remove_testbed(name, directory)
    # Pieces whose names no longer lead to a testbed name (a record lost, say).
    for link in iproute.links():
        if not link.startswith(LINK_PREFIX):
            continue
        if iproute.run(["ip", "link", "del", "dev", link], check=False).returncode == 0:
            removed.append(f"interface {link}")
    for ns in iproute.namespaces():
        if ns.startswith(NAMESPACE_PREFIX):
            for pid in iproute.namespace_pids(ns):
                if stop_process(pid):
                    removed.append(f"process {pid} in {ns}")
            if iproute.run(["ip", "netns", "del", ns], check=False).returncode == 0:
                removed.append(f"namespace {ns}")
    return removed
