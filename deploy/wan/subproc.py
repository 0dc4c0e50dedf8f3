"""Starting this package's own modules (`deploy.wan.delay`, `deploy.wan.iperf`) as child
processes, whatever the current directory and whether or not `deploy` is installed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The directory that holds the `deploy` package.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent


def module_command(module: str, *args: str) -> list[str]:
    """argv that runs `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def module_env() -> dict[str, str]:
    """This process's environment with the `deploy` package importable."""
    env = dict(os.environ)
    paths = [str(SOURCE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env
