"""What the testbed tests share: the skip when this machine cannot build a testbed, and
the check that a testbed left nothing behind."""

from __future__ import annotations

import os
import shutil

import pytest

from deploy.wan import cleanup, iproute
from deploy.wan.layout import bridge_name


def skip_unless_testbed_possible() -> None:
    """Skip the calling module where namespaces and shaping are out of reach."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} (iproute2) not on PATH", allow_module_level=True)
    if os.geteuid() != 0:
        pytest.skip("the WAN testbed needs root (network namespaces, tc)", allow_module_level=True)


def assert_nothing_left(name: str) -> None:
    """No namespace, interface or record of testbed `name` exists."""
    assert cleanup.leftovers(name) == []
    assert not [n for n in iproute.namespaces() if n.startswith(f"arch-{name}-")]
    assert not [link for link in iproute.links() if link.startswith(bridge_name(name))]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
