"""A cluster in containers on one Docker engine: Redis, a coordinator and N workers on a
private bridge network named for the cluster. Only the coordinator's API and dashboard
are published, on the host's 127.0.0.1; Redis and the workers are reachable only from
inside the network. Workers find the coordinator, and each other, by container name.

Everything `up` makes carries the cluster's labels, and `down` removes exactly the
containers and networks that carry them (never the image, which later clusters reuse).
The pure parts (names, labels, the command line of each container) are plain functions,
tested without an engine.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]

from deploy.image import IMAGE, LABEL_ROLE

LABEL_CLUSTER = "org.archipelago.cluster"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# Ports inside the containers (the host's ports are the spec's).
COORDINATOR_PORT = 7070
DASHBOARD_PORT = 7080
WORKER_PORT = 7071
REDIS_PORT = 6379
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")
# The line each role prints once it serves; `up` waits for them.
READY_LINES = {
    "redis": "Ready to accept connections",
    "coordinator": "coordinator listening on",
    "worker": "registered with",
}


class ClusterError(Exception):
    """The cluster cannot be started, found or removed (no engine, a clash, a crash)."""


@dataclass(frozen=True)
class ClusterSpec:
    """One cluster: its name, its workers and how the coordinator is reached from the host."""

    name: str = "main"
    workers: int = 2
    token: str = ""
    # Submits, cancels and reads jobs: given to the coordinator only, never to a worker.
    operator_token: str = ""
    image: str = IMAGE
    # Published on the host's 127.0.0.1 (0: a free port the engine picks).
    coordinator_port: int = COORDINATOR_PORT
    dashboard_port: int = DASHBOARD_PORT
    # Whether the coordinator serves its dashboard (--dashboard), published as above.
    dashboard: bool = True
    threads: int = 0  # torch threads per worker (0: torch's default)
    gflops: float = 0.0  # declared worker speed (0: each worker measures itself)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name):
            raise ClusterError(
                f"cluster name {self.name!r}: up to 31 of a-z, 0-9, '-', '_', starting alnum"
            )
        if self.workers < 0:
            raise ClusterError("--workers must be 0 or more")
        if len(self.token) < 8:
            raise ClusterError("the join token must be at least 8 characters")
        if len(self.operator_token) < 16:
            raise ClusterError("the operator token must be at least 16 characters")
        if self.operator_token == self.token:
            raise ClusterError("the operator token must differ from the join token")
        for port in (self.coordinator_port, self.dashboard_port):
            if not 0 <= port < 65536:
                raise ClusterError(f"port {port} is not a port")


# -- names, labels, command lines (pure) ----------------------------------------------------


def network_name(cluster: str) -> str:
    return f"archipelago-{cluster}"


def container_name(cluster: str, role: str, index: int | None = None) -> str:
    """`archipelago-main-coordinator`, `archipelago-main-worker-0`, ..."""
    suffix = "" if index is None else f"-{index}"
    return f"archipelago-{cluster}-{role}{suffix}"


def labels(cluster: str, role: str) -> dict[str, str]:
    return {LABEL_CLUSTER: cluster, LABEL_ROLE: role}


def redis_command() -> list[str]:
    """Redis for the coordinator's state: on the private network only (no port is
    published), so no password; in memory, since the cluster's state lives as long as
    its containers."""
    return [
        "redis-server",
        "--bind", "0.0.0.0",
        "--port", str(REDIS_PORT),
        "--protected-mode", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", "/tmp",
    ]  # fmt: skip


def coordinator_command(spec: ClusterSpec) -> list[str]:
    """The coordinator on every interface of its container (the engine publishes it on
    the host's loopback only); the token comes from $ARCHIPELAGO_TOKEN (`environment`),
    so it never shows in the host's process list."""
    redis = container_name(spec.name, "redis")
    command = ["archipelago", "coordinator", "--host", "0.0.0.0"]
    command += ["--port", str(COORDINATOR_PORT), "--store", f"redis://{redis}:{REDIS_PORT}/0"]
    command += ["--dashboard", f"0.0.0.0:{DASHBOARD_PORT}" if spec.dashboard else "off"]
    return command


def worker_command(spec: ClusterSpec, index: int) -> list[str]:
    """A worker that joins the coordinator by its container name and tells the others to
    reach it at its own (the network's DNS resolves both)."""
    name = container_name(spec.name, "worker", index)
    coordinator = container_name(spec.name, "coordinator")
    command = ["archipelago", "worker", "--coordinator", f"{coordinator}:{COORDINATOR_PORT}"]
    command += ["--name", f"{spec.name}-worker-{index}"]
    command += ["--listen", f"0.0.0.0:{WORKER_PORT}", "--advertise", f"{name}:{WORKER_PORT}"]
    if spec.threads:
        command += ["--threads", str(spec.threads)]
    if spec.gflops:
        command += ["--gflops", str(spec.gflops)]
    return command


def environment(spec: ClusterSpec, role: str, ca_fingerprint: str = "") -> dict[str, str]:
    """A container's secrets: the join token for all, the operator token for the
    coordinator alone (a worker is a volunteer's, and may not submit or read jobs); a
    worker also gets the fingerprint of the coordinator's TLS authority, as a volunteer
    would be told it."""
    env = {"ARCHIPELAGO_TOKEN": spec.token}
    if role == "coordinator":
        env["ARCHIPELAGO_OPERATOR_TOKEN"] = spec.operator_token
    if role == "worker" and ca_fingerprint:
        env["ARCHIPELAGO_CA_FINGERPRINT"] = ca_fingerprint
    return env


FINGERPRINT_LINE = re.compile(r"tls authority (sha256:[0-9a-f]{64})")


def printed_fingerprint(container: Any) -> str:
    """The TLS authority's fingerprint the coordinator in `container` printed ("": none)."""
    found = FINGERPRINT_LINE.findall(container.logs().decode(errors="replace"))
    return found[-1] if found else ""


# -- the engine ---------------------------------------------------------------------------


def connect(url: str = DEFAULT_ENGINE) -> docker.DockerClient:
    """A client of the engine at `url`, or a one-line ClusterError when none answers.
    The long timeout: one step of a build may print nothing for minutes."""
    try:
        client = docker.DockerClient(base_url=url, version="auto", timeout=900)
        client.ping()
    except docker.errors.DockerException:
        raise ClusterError(f"no Docker engine at {url}: start dockerd") from None
    return client


@dataclass(frozen=True)
class ContainerRow:
    """One container of a cluster as `status` shows it."""

    name: str
    role: str
    state: str
    ports: str  # the host addresses it is published on, "" for none


@dataclass
class ClusterView:
    """Where a running cluster is reached from the host, and what it is made of."""

    name: str
    network: str
    coordinator: str = ""  # HOST:PORT on the host's loopback
    dashboard: str = ""
    # The coordinator's TLS authority, as it printed it (clients check it: `--ca-fingerprint`).
    ca_fingerprint: str = ""
    containers: list[ContainerRow] = field(default_factory=list)


def _label_filter(cluster: str | None) -> dict[str, str]:
    return {"label": f"{LABEL_CLUSTER}={cluster}" if cluster else LABEL_CLUSTER}


def cluster_containers(client: docker.DockerClient, cluster: str | None) -> list[Any]:
    """The containers of `cluster` (None: of every cluster), found by label."""
    return list(client.containers.list(all=True, filters=_label_filter(cluster)))


def cluster_networks(client: docker.DockerClient, cluster: str | None) -> list[Any]:
    return list(client.networks.list(filters=_label_filter(cluster)))


def _published(container: Any, port: int) -> str:
    bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(f"{port}/tcp")
    if not bindings:
        return ""
    return f"{bindings[0]['HostIp']}:{bindings[0]['HostPort']}"


def _row(container: Any) -> ContainerRow:
    ports = [_published(container, p) for p in (COORDINATOR_PORT, DASHBOARD_PORT)]
    return ContainerRow(
        name=container.name,
        role=container.labels.get(LABEL_ROLE, "?"),
        state=container.status,
        ports=" ".join(p for p in ports if p),
    )


def describe(client: docker.DockerClient, cluster: str) -> ClusterView:
    """The cluster as it runs now (an empty container list: it is not up)."""
    view = ClusterView(name=cluster, network=network_name(cluster))
    for container in sorted(cluster_containers(client, cluster), key=lambda c: c.name):
        view.containers.append(_row(container))
        if container.labels.get(LABEL_ROLE) == "coordinator":
            view.coordinator = _published(container, COORDINATOR_PORT)
            view.dashboard = _published(container, DASHBOARD_PORT)
            view.ca_fingerprint = printed_fingerprint(container)
    return view


def cluster_names(client: docker.DockerClient) -> list[str]:
    """Every cluster with a container or network on this engine."""
    found = [c.labels.get(LABEL_CLUSTER) for c in cluster_containers(client, None)]
    found += [n.attrs.get("Labels", {}).get(LABEL_CLUSTER) for n in cluster_networks(client, None)]
    return sorted({n for n in found if n})


def _start(
    client: docker.DockerClient,
    spec: ClusterSpec,
    role: str,
    command: list[str],
    *,
    index: int | None = None,
    ports: dict[str, tuple[str, int | None]] | None = None,
    ca_fingerprint: str = "",
) -> Any:
    return client.containers.run(
        spec.image,
        command,
        name=container_name(spec.name, role, index),
        hostname=container_name(spec.name, role, index),
        labels=labels(spec.name, role),
        network=network_name(spec.name),
        environment=environment(spec, role, ca_fingerprint) if role != "redis" else {},
        ports=ports or {},
        # A crashed process comes back (a few times): what operators expect of a service.
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 3},
        detach=True,
    )


def _crashed(container: Any) -> bool:
    container.reload()
    stopped = container.status in ("exited", "dead", "restarting")
    return stopped or bool(container.attrs.get("RestartCount", 0))


def _failure(container: Any, what: str) -> ClusterError:
    tail = "\n".join(container.logs().decode(errors="replace").splitlines()[-20:])
    return ClusterError(f"{container.name} {what}; its last lines:\n{tail}")


def _wait_ready(container: Any, role: str, timeout_s: float, running: tuple[Any, ...] = ()) -> None:
    """Until `container` has printed its role's ready line. It, or one of the `running`
    containers it needs, stopping or restarting first fails `up` with its last lines."""
    deadline = time.monotonic() + timeout_s
    while READY_LINES[role] not in container.logs().decode(errors="replace"):
        for needed in (container, *running):
            if _crashed(needed):
                raise _failure(needed, f"stopped ({needed.status})")
        if time.monotonic() > deadline:
            raise _failure(container, f"was not ready in {timeout_s:.0f} s")
        time.sleep(0.3)


def up(
    client: docker.DockerClient,
    spec: ClusterSpec,
    progress: Callable[[str], None] = print,
    ready_timeout_s: float = 120.0,
) -> ClusterView:
    """Start the cluster from `spec.image` (already built) and wait until every worker
    has registered. A failed start removes what it made before raising."""
    if cluster_containers(client, spec.name) or cluster_networks(client, spec.name):
        raise ClusterError(
            f"cluster {spec.name!r} is already up; `archipelago cluster down --name "
            f"{spec.name}` first, or choose another --name"
        )
    try:
        client.networks.create(
            network_name(spec.name), driver="bridge", labels=labels(spec.name, "network")
        )
        progress(f"network {network_name(spec.name)}; starting redis")
        redis = _start(client, spec, "redis", redis_command())
        _wait_ready(redis, "redis", ready_timeout_s)
        progress("starting the coordinator")
        ports: dict[str, tuple[str, int | None]] = {
            f"{COORDINATOR_PORT}/tcp": ("127.0.0.1", spec.coordinator_port or None)
        }
        if spec.dashboard:
            ports[f"{DASHBOARD_PORT}/tcp"] = ("127.0.0.1", spec.dashboard_port or None)
        coordinator = _start(client, spec, "coordinator", coordinator_command(spec), ports=ports)
        _wait_ready(coordinator, "coordinator", ready_timeout_s, running=(redis,))
        # The workers join by the authority's fingerprint, as volunteers do.
        fingerprint = printed_fingerprint(coordinator)
        if not fingerprint:
            raise _failure(coordinator, "printed no TLS authority")
        progress(f"starting {spec.workers} worker(s)")
        workers = [
            _start(
                client,
                spec,
                "worker",
                worker_command(spec, i),
                index=i,
                ca_fingerprint=fingerprint,
            )
            for i in range(spec.workers)
        ]
        for worker in workers:
            _wait_ready(worker, "worker", ready_timeout_s, running=(redis, coordinator))
    except BaseException as e:  # Ctrl-C too: a half-started cluster is never left behind
        down(client, spec.name, progress=lambda _: None)
        if isinstance(e, docker.errors.DockerException):
            raise ClusterError(f"starting cluster {spec.name!r} failed: {e}") from None
        raise
    return describe(client, spec.name)


def down(
    client: docker.DockerClient, cluster: str, progress: Callable[[str], None] = print
) -> tuple[int, int]:
    """Remove every container, then every network, labelled as `cluster`'s; returns how
    many of each. Nothing without the label is touched."""
    containers = cluster_containers(client, cluster)
    for container in containers:
        progress(f"removing {container.name}")
        # v: the anonymous volumes of this container only (the image declares none).
        with contextlib.suppress(docker.errors.NotFound):  # already gone meanwhile
            container.remove(force=True, v=True)
    networks = cluster_networks(client, cluster)
    for network in networks:
        progress(f"removing network {network.name}")
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
    return len(containers), len(networks)
