"""The Archipelago image, built through the Docker engine from a context this module
assembles: the project's sources (what git tracks or would track, never .venv), the CPU
wheel of torch and a wheelhouse of every other dependency downloaded once on the host.

The wheelhouse exists because a build container here cannot verify PyPI's certificate
(the host reaches it through a proxy whose CA only the host trusts) and because it keeps
builds offline and repeatable: with it, the build runs with no network at all.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from deploy.image_requirements import image_requirements

IMAGE = "archipelago:local"
DOCKERFILE = "deploy/Dockerfile"
DEFAULT_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TORCH_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
# What the image is built from: the installable packages (pyproject.toml's
# packages.find) and the two files the package's metadata reads.
PACKAGES = ("archipelago", "compressors", "coordinator", "deploy", "opdag", "proto", "worker")
TOP_FILES = ("pyproject.toml", "README.md")
WHEELS_DIR = "deploy/wheels"  # its README only; the context's wheels go to CONTEXT_WHEELS
CONTEXT_WHEELS = "wheels"
LS_FILES_ARGS = ("--cached", "--others", "--exclude-standard")
# Where the wheelhouse is downloaded, inside its throwaway container.
WHEELHOUSE_SCRIPT = (
    "python3.11 -m venv /tmp/pip && /tmp/pip/bin/pip download --quiet --no-cache-dir "
    "--disable-pip-version-check --cert /run/host-ca.crt --dest /out/wheels "
    "/run/wheels/{torch} -r /out/requirements.txt"
)
LABEL_ROLE = "org.archipelago.role"


class ImageError(Exception):
    """The image cannot be built (no checkout, no torch wheel, a failed download or step)."""


def source_root() -> Path:
    """The checkout this module lies in (deploy/ is one of its top-level packages)."""
    return Path(__file__).resolve().parents[1]


def listed_files(root: Path) -> list[str]:
    """Paths git tracks in `root`, and untracked ones it does not ignore (a new module
    not yet committed still belongs in the image; .venv and build outputs never do)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", *LS_FILES_ARGS],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ImageError(
            f"the image is built from a git checkout of Archipelago; {root} is not one ({e})"
        ) from None
    return sorted({p for p in out.decode().split("\0") if p})


def context_files(paths: Iterable[str]) -> list[str]:
    """Of the checkout's paths, those the image needs, sorted: the packages' files and
    pyproject.toml/README.md. Tests, benchmarks and examples stay out, so editing them
    rebuilds nothing; so does anything under deploy/wheels/ but its README."""
    chosen = set()
    for path in paths:
        parts = path.split("/")
        if path in TOP_FILES or (len(parts) > 1 and parts[0] in PACKAGES):
            if "__pycache__" in parts or path.endswith(".pyc"):
                continue
            if path.startswith(f"{WHEELS_DIR}/") and path != f"{WHEELS_DIR}/README.md":
                continue
            chosen.add(path)
    return sorted(chosen)


def _add(tar: tarfile.TarFile, name: str, source: Path) -> None:
    # Fixed owner, mode and time: the same files give the same context, so the engine's
    # layer cache holds across checkouts and runs.
    info = tarfile.TarInfo(name)
    info.size = source.stat().st_size
    info.mode = 0o755 if source.stat().st_mode & 0o111 else 0o644
    info.mtime = 0
    with source.open("rb") as f:
        tar.addfile(info, f)


def write_context(
    out: Path, *, root: Path, files: Iterable[str], torch_wheel: Path, wheelhouse: Path | None
) -> None:
    """The build context as a tar file: `files` of `root`, the torch wheel as
    wheels/<its name> and the wheelhouse's wheels under wheels/deps/."""
    with tarfile.open(out, "w") as tar:
        for name in files:
            source = root / name
            if source.is_file():  # a tracked file deleted in the work tree is left out
                _add(tar, name, source)
        _add(tar, f"{CONTEXT_WHEELS}/{torch_wheel.name}", torch_wheel)
        if wheelhouse is not None:
            for wheel in sorted(wheelhouse.glob("*.whl")):
                _add(tar, f"{CONTEXT_WHEELS}/deps/{wheel.name}", wheel)


def wheelhouse_key(requirements: list[str], torch_wheel: Path, base: str) -> str:
    """Names a wheelhouse by what it was downloaded for (the base: its interpreter decides
    which wheels and environment markers apply), so a changed pyproject.toml downloads a
    new one instead of building from a stale one."""
    inputs = "\n".join([*requirements, torch_wheel.name, base])
    return hashlib.sha256(inputs.encode()).hexdigest()[:16]


def ensure_wheelhouse(
    client: docker.DockerClient, build: ImageBuild, root: Path, progress: Callable[[str], None]
) -> Path:
    """A folder of wheels for every requirement of the image but torch itself (torch's
    own dependencies included), downloaded the first time, then reused.

    pip runs in a throwaway container of the base image, so wheels and environment markers
    are chosen by the image's interpreter (Debian's 3.11.2 here, not the host's); it
    trusts the host's CA bundle, mounted read-only for that run only and never put in the
    image (a host may reach PyPI through a proxy whose CA only the host trusts)."""
    requirements = image_requirements(root / "pyproject.toml")
    key = wheelhouse_key(requirements, build.torch_wheel, build.base)
    house = build.cache_dir / f"wheelhouse-{key}"
    if (house / ".complete").exists():
        return house
    if not build.ca_bundle.is_file():
        raise ImageError(f"no CA bundle at {build.ca_bundle} to download the wheels with")
    progress(f"downloading the image's dependencies into {house} (once)")
    build.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build.cache_dir, prefix="wheelhouse-") as tmp:
        out = Path(tmp)
        (out / "requirements.txt").write_text("\n".join(requirements) + "\n")
        volumes = {
            str(out): {"bind": "/out", "mode": "rw"},
            str(build.torch_wheel.parent): {"bind": "/run/wheels", "mode": "ro"},
            str(build.ca_bundle): {"bind": "/run/host-ca.crt", "mode": "ro"},
        }
        try:
            client.containers.run(
                build.base,
                ["sh", "-c", WHEELHOUSE_SCRIPT.format(torch=build.torch_wheel.name)],
                volumes=volumes,
                # The host's own network: PyPI is reached as the host reaches it, also from
                # an engine that does no NAT for its containers (dockerd --iptables=false).
                network_mode="host",
                labels={LABEL_ROLE: "wheelhouse"},
                remove=True,
                stdout=False,
                stderr=True,
            )
        except docker.errors.ContainerError as e:
            tail = "\n".join(str(e.stderr or b"", "utf-8", "replace").splitlines()[-15:])
            raise ImageError(f"downloading the image's dependencies failed:\n{tail}") from None
        wheels = out / "wheels"
        # pip saves a copy of the torch wheel it was pointed at; torch travels on its own.
        for copy in wheels.glob("torch-*.whl"):
            copy.unlink()
        (wheels / ".complete").write_text("\n".join(requirements) + "\n")
        if house.exists():  # a half-finished earlier attempt
            shutil.rmtree(house)
        wheels.rename(house)
    return house


@dataclass(frozen=True)
class ImageBuild:
    """What to build: the image's tag, its base, and whether the build may use the network
    (not needed when the base carries redis-server and the wheels travel in the context)."""

    tag: str = IMAGE
    base: str = "python:3.11-slim-bookworm"
    offline: bool = True
    torch_wheel: Path = TORCH_WHEEL
    cache_dir: Path = Path.home() / ".cache" / "archipelago"
    # What the wheelhouse's download trusts: the host's own bundle.
    ca_bundle: Path = Path(ssl.get_default_verify_paths().cafile or DEFAULT_CA_BUNDLE)


def build_image(
    client: docker.DockerClient,
    build: ImageBuild,
    progress: Callable[[str], None] = print,
    root: Path | None = None,
) -> str:
    """Build (or, from the engine's layer cache, re-tag) the image; returns its id."""
    root = root or source_root()
    if not build.torch_wheel.is_file():
        raise ImageError(
            f"the CPU wheel of torch is not at {build.torch_wheel}; any other torch install "
            "downloads a multi-GB CUDA build"
        )
    files = context_files(listed_files(root))
    if DOCKERFILE not in files:
        raise ImageError(f"{root / DOCKERFILE} is missing")
    house = ensure_wheelhouse(client, build, root, progress)
    with tempfile.TemporaryDirectory(prefix="archipelago-context-") as tmp:
        context = Path(tmp) / "context.tar"
        write_context(
            context, root=root, files=files, torch_wheel=build.torch_wheel, wheelhouse=house
        )
        progress(
            f"building {build.tag} on {build.base} "
            f"({context.stat().st_size / 2**20:.0f} MiB context; minutes the first time)"
        )
        with context.open("rb") as f:
            stream = client.api.build(
                fileobj=f,
                custom_context=True,
                dockerfile=DOCKERFILE,
                tag=build.tag,
                buildargs={"BASE": build.base},
                rm=True,
                forcerm=True,
                network_mode="none" if build.offline else None,
                decode=True,
            )
            return _follow_build(stream, progress)


def _follow_build(stream: Iterable[dict[str, Any]], progress: Callable[[str], None]) -> str:
    """Print each step as the engine reaches it (with the seconds since the build began)
    and return the image id; a failed step raises with the build's last lines."""
    start = time.monotonic()
    tail: list[str] = []
    image_id = ""
    for chunk in stream:
        if "error" in chunk:
            raise ImageError(f"image build failed: {chunk['error'].strip()}\n" + "\n".join(tail))
        text = str(chunk.get("stream", ""))
        for line in text.splitlines():
            if not line.strip():
                continue
            tail = [*tail[-24:], line]
            if line.startswith("Step "):
                progress(f"  [{time.monotonic() - start:5.0f} s] {_short(line)}")
        aux = chunk.get("aux")
        if isinstance(aux, dict) and "ID" in aux:
            image_id = str(aux["ID"])
    if not image_id:
        raise ImageError("image build ended without an image:\n" + "\n".join(tail))
    progress(f"built {image_id[:19]} in {time.monotonic() - start:.0f} s")
    return image_id


def _short(line: str, width: int = 100) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def describe(client: docker.DockerClient, tag: str) -> str:
    """The image's tag and size, for the progress output."""
    size = client.images.get(tag).attrs.get("Size", 0)
    return f"{tag} ({size / 2**20:.0f} MiB)"
