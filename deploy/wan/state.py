"""The record of a testbed that exists: one small JSON file per testbed in
/run/archipelago-testbed/. It is written before anything is built, so even a build that
dies half-way leaves behind what `archipelago testbed down` needs to find its pieces.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.wan.errors import TestbedError
from deploy.wan.spec import TestbedSpec, parse_spec

STATE_DIR = Path("/run/archipelago-testbed")


@dataclass(frozen=True)
class TestbedState:
    """What is recorded of a built testbed."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    spec: dict[str, Any]
    owner_pid: int  # the process that built it
    detached: bool  # True: left up (`testbed up`); False: lives as long as its owner
    delay_pid: int | None = None
    created_at: float = field(default_factory=time.time)

    def testbed_spec(self) -> TestbedSpec:
        return parse_spec(self.spec)


def state_path(name: str, directory: Path = STATE_DIR) -> Path:
    return directory / f"{name}.json"


def delay_log_path(name: str, directory: Path = STATE_DIR) -> Path:
    return directory / f"{name}.delay.log"


def write_state(state: TestbedState, directory: Path = STATE_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = state_path(state.name, directory)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


def read_state(name: str, directory: Path = STATE_DIR) -> TestbedState | None:
    path = state_path(name, directory)
    try:
        data = json.loads(path.read_text())
        return TestbedState(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise TestbedError(
            f"{path}: unreadable testbed record ({e}); `archipelago testbed down {name}` "
            "removes it with whatever it names"
        ) from None


def recorded_names(directory: Path = STATE_DIR) -> list[str]:
    """Names of every testbed with a record."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.json"))


def remove_records(name: str, directory: Path = STATE_DIR) -> list[str]:
    removed = []
    for path in (state_path(name, directory), delay_log_path(name, directory)):
        try:
            path.unlink()
            removed.append(str(path))
        except FileNotFoundError:
            pass
    return removed
