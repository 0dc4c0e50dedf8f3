"""The `archipelago cluster` subcommands: `up`, `down` and `status` of a cluster in
containers (Redis, a coordinator, N workers) on the local Docker engine.

`up` builds the image first (the engine's layer cache makes a rebuild take seconds; the
first build takes minutes, with each step printed as it starts), then starts the
containers and waits until every worker has registered. The work lives in `deploy`
(`deploy.cluster`, `deploy.image`, `deploy.base_image`), imported only when a cluster
subcommand runs.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from archipelago.errors import UsageError

if TYPE_CHECKING:
    from docker import DockerClient  # type: ignore[import-untyped]

    from deploy.cluster import ClusterView


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="a cluster in containers on the local Docker engine")
    csub = p.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    q = csub.add_parser("up", help="build the image, start Redis, a coordinator and workers")
    q.add_argument("--workers", type=int, required=True, metavar="N")
    _name_arg(q)
    q.add_argument(
        "--token",
        default=os.environ.get("ARCHIPELAGO_TOKEN"),
        help="the join token (default: $ARCHIPELAGO_TOKEN, else a new one, printed)",
    )
    q.add_argument(
        "--operator-token",
        default=os.environ.get("ARCHIPELAGO_OPERATOR_TOKEN"),
        help="the operator token, to submit, cancel and read jobs (default: "
        "$ARCHIPELAGO_OPERATOR_TOKEN, else a new one, written to a file only you can read)",
    )
    q.add_argument(
        "--port", type=int, default=7070, help="host port of the coordinator on 127.0.0.1 (0: any)"
    )
    q.add_argument(
        "--dashboard-port", type=int, default=7080, help="host port of the dashboard (0: any)"
    )
    q.add_argument("--no-dashboard", action="store_true", help="the coordinator serves none")
    q.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: default)")
    q.add_argument(
        "--gflops", type=float, default=0.0, help="declared worker speed (0: each measures)"
    )
    _image_args(q)
    q.add_argument("--no-build", action="store_true", help="start from the image as it is")
    _engine_arg(q)
    q.set_defaults(func=cmd_up)

    q = csub.add_parser("build", help="build the image only (for compose or docker run)")
    _image_args(q)
    _engine_arg(q)
    q.set_defaults(func=cmd_build)

    q = csub.add_parser("down", help="remove a cluster's containers and network")
    _name_arg(q)
    _engine_arg(q)
    q.set_defaults(func=cmd_down)

    q = csub.add_parser("status", help="the containers of a cluster (default: of every one)")
    q.add_argument("--name", default=None, help="one cluster (default: every cluster)")
    _engine_arg(q)
    q.set_defaults(func=cmd_status)


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="the image's tag (default archipelago:local)")
    p.add_argument(
        "--base",
        default=None,
        metavar="IMAGE",
        help="base image to build on (default: a Debian bookworm base built here with "
        "debootstrap, since no registry is reachable; elsewhere python:3.11-slim-bookworm)",
    )


def _name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="main", help="the cluster's name (default: main)")


def _engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        default=os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock",
        metavar="URL",
        help="the Docker engine (default: $DOCKER_HOST or unix:///var/run/docker.sock)",
    )


def _say(line: str) -> None:
    print(line, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    import docker.errors  # type: ignore[import-untyped]

    from deploy.base_image import BaseImageError
    from deploy.cluster import ClusterError, ClusterSpec, connect, up
    from deploy.image import IMAGE, ImageError

    token = args.token or secrets.token_urlsafe(18)
    operator_token = args.operator_token or secrets.token_urlsafe(32)
    try:
        spec = ClusterSpec(
            name=args.name,
            workers=args.workers,
            token=token,
            operator_token=operator_token,
            image=args.image or IMAGE,
            coordinator_port=args.port,
            dashboard_port=args.dashboard_port,
            dashboard=not args.no_dashboard,
            threads=args.threads,
            gflops=args.gflops,
        )
        client = connect(args.engine)
        if not args.no_build:
            _build(client, spec.image, args.base)
        view = up(client, spec, progress=_say)
    except (ClusterError, ImageError, BaseImageError, docker.errors.DockerException) as e:
        raise UsageError(str(e)) from None
    _print_up(view, spec.workers)
    if not args.token:
        _say(f"  a new join token: {token}")
    if not args.operator_token:
        # A secret that opens every job: into a file of the operator's own, not the terminal.
        path = operator_token_path(args.name)
        write_private(path, operator_token + "\n")
        _say(f"  a new operator token, in {path} (the dashboard's login and every command's)")
        _say(f"  export ARCHIPELAGO_OPERATOR_TOKEN=$(cat {path})")
    _say(
        f"  export ARCHIPELAGO_COORDINATOR={view.coordinator} "
        f"ARCHIPELAGO_CA_FINGERPRINT={view.ca_fingerprint} ARCHIPELAGO_TOKEN=..."
    )
    return 0


def operator_token_path(cluster: str) -> Path:
    """Where `cluster up` keeps the operator token it made for `cluster`."""
    return Path.home() / ".archipelago" / f"cluster-{cluster}-operator-token"


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only, with no moment of wider access."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _build(client: DockerClient, image: str, base: str | None) -> None:
    from deploy.base_image import REPOSITORY, ensure_base_image
    from deploy.image import ImageBuild, build_image, describe

    # The local base carries redis-server and the wheels travel in the context: that
    # build needs no network at all; another base may need apt for redis-server.
    base = base or ensure_base_image(client, progress=_say)
    offline = base.startswith(f"{REPOSITORY}:")
    build_image(client, ImageBuild(tag=image, base=base, offline=offline), _say)
    _say(f"image {describe(client, image)}")


def cmd_build(args: argparse.Namespace) -> int:
    import docker.errors

    from deploy.base_image import BaseImageError
    from deploy.cluster import ClusterError, connect
    from deploy.image import IMAGE, ImageError

    try:
        _build(connect(args.engine), args.image or IMAGE, args.base)
    except (ClusterError, ImageError, BaseImageError, docker.errors.DockerException) as e:
        raise UsageError(str(e)) from None
    return 0


def _print_up(view: ClusterView, workers: int) -> None:
    _say(
        f"cluster {view.name} is up on network {view.network}: "
        f"redis, a coordinator and {workers} worker(s)"
    )
    _say(f"  coordinator  {view.coordinator}")
    _say(f"  TLS authority {view.ca_fingerprint} (commands and volunteers: --ca-fingerprint)")
    if view.dashboard:
        _say(f"  dashboard    http://{view.dashboard}/")


def cmd_down(args: argparse.Namespace) -> int:
    import docker.errors

    from deploy.cluster import ClusterError, connect, down

    try:
        containers, networks = down(connect(args.engine), args.name, progress=_say)
    except (ClusterError, docker.errors.DockerException) as e:
        raise UsageError(str(e)) from None
    if not containers and not networks:
        _say(f"no cluster named {args.name!r} on this engine")
    else:
        _say(f"cluster {args.name} removed: {containers} container(s), {networks} network(s)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import docker.errors

    from deploy.cluster import ClusterError, cluster_names, connect, describe

    try:
        client = connect(args.engine)
        names = [args.name] if args.name else cluster_names(client)
        views = [describe(client, name) for name in names]
    except (ClusterError, docker.errors.DockerException) as e:
        raise UsageError(str(e)) from None
    if not any(v.containers for v in views):
        _say("no cluster is up" if not args.name else f"cluster {args.name} is not up")
        return 0 if not args.name else 1
    for view in views:
        _say(f"cluster {view.name} (network {view.network}), coordinator {view.coordinator or '-'}")
        for row in view.containers:
            ports = f"  on {row.ports}" if row.ports else ""
            _say(f"  {row.name:<36} {row.role:<12} {row.state}{ports}")
    return 0
