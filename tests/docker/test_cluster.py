"""The cluster in containers, end to end on a real Docker engine: `archipelago cluster up
--workers 2` (run as a user runs it) builds the image and starts Redis, a coordinator and
two workers in containers; a job submitted from the host through the published port
completes on both workers; `cluster down` removes every container and network it made.

The engine: the one that answers, or, as root with docker.io installed, a dockerd this
session starts (and stops). Without docker.io, or not root, the module is skipped.
The first run builds the base image (debootstrap) and every layer, minutes; later runs
reuse them from the engine's cache and take about a minute."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from archipelago.client import CoordinatorClient
from deploy.cluster import DEFAULT_ENGINE, LABEL_CLUSTER, describe
from deploy.image import LABEL_ROLE
from proto.cluster_tls import ClientTls, fetch_coordinator_certificate

pytestmark = pytest.mark.docker

TOKEN = "docker-cluster-token"
OPERATOR = "docker-cluster-operator-token"
SPEC = """
name: in-containers
model: {zoo: gpt, args: {layers: 1, d_model: 32, heads: 2, context: 16}}
data: {corpus: stdlib-text, batch_size: 4, micro_batches: 1, max_bytes: 200000}
optimizer: {name: adamw, lr: 1.0e-3}
steps: 6
parallel: {stages: 2}
"""
ENGINE_START_S = 60.0
# A cold build (debootstrap, torch, the dependencies) takes minutes on 2 cores.
UP_TIMEOUT_S = 1200


def _engine() -> docker.DockerClient | None:
    try:
        client = docker.DockerClient(base_url=DEFAULT_ENGINE, version="auto", timeout=900)
        client.ping()
    except docker.errors.DockerException:
        return None
    return client


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[docker.DockerClient]:
    """A client of a running engine, starting dockerd first when none answers."""
    client = _engine()
    if client is not None:
        yield client
        client.close()
        return
    if shutil.which("dockerd") is None:
        pytest.skip("docker.io is not installed (apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("starting dockerd for the Docker tests needs root")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    # Without iptables: an engine that manages the firewall sets the FORWARD policy to DROP
    # for the whole machine, which would cut the WAN testbed's hosts off from each other in
    # the tiers that run after this one. The cluster needs no NAT: its ports are published
    # by the engine's userland proxy and only the wheel download goes out, on the host's
    # own network.
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-masq=false"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + ENGINE_START_S
        while (client := _engine()) is None:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dockerd did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield client
        client.close()
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def archipelago(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`archipelago ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "archipelago.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def made_by(client: docker.DockerClient, cluster: str) -> tuple[list[str], list[str]]:
    """The names of the containers and networks carrying `cluster`'s label."""
    label = {"label": f"{LABEL_CLUSTER}={cluster}"}
    containers = [c.name for c in client.containers.list(all=True, filters=label)]
    return containers, [n.name for n in client.networks.list(filters=label)]


def test_cluster_up_runs_a_job_from_the_host_and_down_removes_all_it_made(
    engine: docker.DockerClient, tmp_path: Path
) -> None:
    name = f"test{os.getpid()}"  # never an operator's own cluster
    started = time.monotonic()
    up = archipelago(
        "cluster", "up", "--workers", "2", "--name", name, "--token", TOKEN,
        "--operator-token", OPERATOR,
        "--port", "0", "--dashboard-port", "0", "--threads", "1",
        timeout=UP_TIMEOUT_S,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        print(f"cluster up took {time.monotonic() - started:.0f} s")
        assert "Step " in up.stdout and f"cluster {name} is up" in up.stdout  # progress shown
        containers = engine.containers.list(filters={"label": f"{LABEL_CLUSTER}={name}"})
        roles = sorted(c.labels[LABEL_ROLE] for c in containers)
        assert roles == ["coordinator", "redis", "worker", "worker"]
        assert all(c.status == "running" for c in containers)
        view = describe(engine, name)
        assert view.coordinator.startswith("127.0.0.1:") and view.dashboard.startswith("127.0.0.1:")
        # Over TLS by default: the host's commands check the authority the coordinator printed.
        assert view.ca_fingerprint.startswith("sha256:"), up.stdout
        assert f"TLS authority {view.ca_fingerprint}" in up.stdout

        spec = tmp_path / "job.yaml"
        spec.write_text(SPEC)
        common = (
            "--coordinator", view.coordinator, "--operator-token", OPERATOR,
            "--ca-fingerprint", view.ca_fingerprint,
        )  # fmt: skip
        submit = archipelago("submit", str(spec), *common, "--watch", timeout=300)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        job_id = submit.stdout.split()[0]
        authority = fetch_coordinator_certificate(view.coordinator, view.ca_fingerprint)
        client = CoordinatorClient(
            view.coordinator, operator_token=OPERATOR, tls=ClientTls(authority)
        )
        try:
            job = client.job(job_id, with_metrics=True)
            workers = {w.name for w in client.workers()}
        finally:
            client.close()
        assert job.state == "completed" and job.steps_done == 6
        assert {s.worker_name for s in job.stages} == {f"{name}-worker-0", f"{name}-worker-1"}
        assert workers == {f"{name}-worker-0", f"{name}-worker-1"}
        assert sorted(m.step for m in job.metrics) == list(range(6))

        # The dashboard is published too, and answers with its login (never the pages).
        try:
            with urllib.request.urlopen(f"http://{view.dashboard}/", timeout=10) as page:
                assert "token" in page.read().decode().lower()
        except urllib.error.HTTPError as e:  # the login page may come with a 401
            assert e.code == 401
    finally:
        down = archipelago("cluster", "down", "--name", name, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert made_by(engine, name) == ([], [])
