"""The local base image: Debian bookworm with Python 3.11 and redis-server, built with
debootstrap and `docker import` on machines that can reach Debian's mirror but no image
registry. Elsewhere the Dockerfile takes `python:3.11-slim-bookworm` instead.

The image is tagged by its inputs (suite, variant, packages), so it is built once per
machine and a change of packages builds a new one rather than reusing a stale one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

REPOSITORY = "archipelago-base"


class BaseImageError(Exception):
    """The base image cannot be built here (no debootstrap, not root, debootstrap failed)."""


@dataclass(frozen=True)
class BaseImageSpec:
    """What goes into the base image; its tag is derived from exactly these fields."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    # redis-server: the cluster's Redis runs from the same image (no redis image can be pulled).
    packages: tuple[str, ...] = (
        "python3.11",
        "python3.11-venv",
        # python3.11-venv depends on the virtual python3.11-distutils, which debootstrap's
        # resolver cannot follow; this is the package that provides it.
        "python3-distutils",
        "ca-certificates",
        "redis-server",
    )

    @property
    def tag(self) -> str:
        """`archipelago-base:bookworm-minbase-<hash>`: names the inputs (the mirror is
        where they come from, not what they are, so it is left out)."""
        inputs = "\n".join([self.suite, self.variant, *sorted(self.packages)])
        digest = hashlib.sha256(inputs.encode()).hexdigest()[:12]
        return f"{REPOSITORY}:{self.suite}-{self.variant}-{digest}"

    def debootstrap_command(self, target: Path) -> list[str]:
        return [
            "debootstrap",
            f"--variant={self.variant}",
            f"--include={','.join(self.packages)}",
            self.suite,
            str(target),
            self.mirror,
        ]


# Set on the imported image: an imported rootfs carries no environment or command.
IMAGE_CHANGES = ("ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]')
# Left out of the tarball: downloaded packages and indexes (rebuilt by apt-get update).
PRUNED = ("var/cache/apt/archives", "var/lib/apt/lists")


def has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_base_image(
    client: docker.DockerClient,
    spec: BaseImageSpec | None = None,
    progress: Callable[[str], None] = print,
) -> str:
    """The base image's tag, building it first when this engine lacks it."""
    spec = spec or BaseImageSpec()
    if has_image(client, spec.tag):
        return spec.tag
    if shutil.which("debootstrap") is None:
        raise BaseImageError(
            f"the base image {spec.tag} is missing and debootstrap is not installed "
            "(apt-get install debootstrap), or pass a base image such as "
            "python:3.11-slim-bookworm with --base"
        )
    if os.geteuid() != 0:
        raise BaseImageError(f"building the base image {spec.tag} with debootstrap needs root")
    progress(f"building the base image {spec.tag} with debootstrap (about a minute)")
    with tempfile.TemporaryDirectory(prefix="archipelago-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run = subprocess.run(
            spec.debootstrap_command(rootfs), capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            tail = "\n".join((run.stdout + run.stderr).splitlines()[-15:])
            raise BaseImageError(f"debootstrap failed ({run.returncode}):\n{tail}")
        for pruned in PRUNED:
            for entry in (rootfs / pruned).glob("*"):
                if entry.is_file():
                    entry.unlink()
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
            check=True,
        )
        progress(f"importing the base image {spec.tag}")
        repository, tag = spec.tag.split(":")
        client.api.import_image_from_file(
            str(tarball), repository=repository, tag=tag, changes=list(IMAGE_CHANGES)
        )
    if not has_image(client, spec.tag):
        raise BaseImageError(f"docker import did not produce {spec.tag}")
    return spec.tag
