"""The Python requirements of the image, read from pyproject.toml: what the project needs
to run, what builds it (setuptools) and what generates its protobuf modules (grpcio-tools,
pinned in the dev extra). Standard library only: the Dockerfile runs it before anything is
installed (`python image_requirements.py pyproject.toml`), and `deploy.image` imports it to
download the same wheels on the host."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

# Of the dev extra, only what the image's build runs.
BUILD_TOOLS = ("grpcio-tools",)


def image_requirements(pyproject: Path) -> list[str]:
    """Requirement lines, in pyproject.toml's order: dependencies, build requires, tools."""
    data = tomllib.loads(pyproject.read_text())
    dev = data["project"].get("optional-dependencies", {}).get("dev", [])
    tools = [d for d in dev if d.replace("_", "-").startswith(BUILD_TOOLS)]
    return [*data["project"]["dependencies"], *data["build-system"]["requires"], *tools]


if __name__ == "__main__":
    print("\n".join(image_requirements(Path(sys.argv[1]))))
